"""Initial centroids: distinct random data points (the paper) or k-means++.

Both depend only on the seed and the data, never on the number of devices:
``random`` draws row ids with numpy on the host; ``kmeans++`` draws with a Gumbel
key per *global* row id and reduces with max/min, which are exact in any order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from deeper_jax.cluster.layout import RowLayout, Rows, rows_to_hosts, shard_index
from deeper_jax.runtime.mesh import DATA_AXES


def _gather_rows(x, rows: np.ndarray) -> np.ndarray:
  if hasattr(x, "read_rows"):  # spilled rows (cluster/spill.py): read from their files
    return x.read_rows(rows)
  if isinstance(x, Rows):
    return rows_to_hosts(x, rows).astype(np.float32)
  if isinstance(x, jax.Array):
    return np.asarray(x[jnp.asarray(rows)], np.float32)
  return np.asarray(x[rows], np.float32)


def random_points(x, k: int, seed: int, num_rows: int | None = None) -> np.ndarray:
  """``k`` random rows, drawn without replacement and distinct in *content*.

  The reference draws k row ids without replacement; on data with repeated rows
  (duplicated images) that gives identical centroids, ties, and empty clusters from
  the first iteration. So we draw a shuffled pool of rows, keep each content's first
  occurrence in draw order, and take the first k. The pool starts at ~2k rows and
  becomes every row (read a pool at a time, until k distinct rows are found) only
  when duplicates are rife. With fewer than k distinct rows in the data, duplicates
  fill the rest (some clusters must then end up empty). Draws among the first
  ``num_rows`` rows (default: all); only the drawn rows are read, so ``x`` may be
  :class:`Rows` spread over many processes.
  """
  n = x.shape[0] if num_rows is None else num_rows
  rng = np.random.default_rng(seed)
  pool = min(n, 2 * k + 64)
  order = rng.choice(n, size=pool, replace=False)
  rows = _gather_rows(x, order)
  _, first = np.unique(rows, axis=0, return_index=True)
  if len(first) < k and pool < n:
    rest = np.setdiff1d(np.arange(n), order)
    order = np.concatenate([order, rng.permutation(rest)])
    while len(first) < k and len(rows) < len(order):
      rows = np.concatenate([rows, _gather_rows(x, order[len(rows):len(rows) + pool])])
      _, first = np.unique(rows, axis=0, return_index=True)
    order = order[:len(rows)]
  keep = np.sort(first)[:k]
  if len(keep) < k:
    logging.warning("only %d distinct rows for k=%d: some initial centroids repeat.",
                    len(keep), k)
    extra = np.setdiff1d(np.arange(len(order)), keep)[:k - len(keep)]
    keep = np.concatenate([keep, extra])
  return rows[keep]


def spatial_order(centroids: np.ndarray, run: int) -> np.ndarray:
  """A permutation of centroid ids whose consecutive runs of ``run`` are close in space.

  Recursive halving along the principal axis (a few power iterations), splitting
  at multiples of ``run``: the runs then act as Yinyang's centroid groups, whose
  lower bounds are only useful when a group is compact. Deterministic.
  """
  c = np.asarray(centroids, np.float64)
  runs = []

  def halve(ids):
    if len(ids) <= run:
      runs.append(ids)
      return
    sub = c[ids] - c[ids].mean(axis=0)
    axis = sub[np.argmax(np.einsum("ij,ij->i", sub, sub))]
    for _ in range(8):
      axis = sub.T @ (sub @ axis)
      norm = np.linalg.norm(axis)
      if norm == 0:
        break
      axis /= norm
    ids = ids[np.argsort(sub @ axis, kind="stable")]
    cut = max(run, (len(ids) // 2) // run * run)
    halve(ids[:cut])
    halve(ids[cut:])

  halve(np.arange(len(c)))
  return np.concatenate(runs)


@functools.lru_cache(maxsize=16)
def _kmeanspp_fn(mesh: Mesh, layout: RowLayout, k: int):
  per_shard = layout.rows_per_shard

  def shard_fn(x, n, key):
    rows = shard_index() * per_shard + jnp.arange(per_shard, dtype=jnp.int32)
    valid = rows < n
    gumbel_of_row = jax.vmap(lambda kk, r: jax.random.gumbel(jax.random.fold_in(kk, r)),
                             in_axes=(None, 0))

    def pick(t, min_sq):
      # D^2 sampling as a Gumbel argmax: score = log D^2 + G(row). Rows already at
      # distance 0 (chosen, or duplicates of a chosen row) get a score of -1e30.
      g = gumbel_of_row(jax.random.fold_in(key, t), rows)
      score = jnp.where(min_sq > 0, jnp.log(jnp.where(min_sq > 0, min_sq, 1.0)), -1e30) + g
      score = jnp.where(valid, score, -jnp.inf)
      local = jnp.argmax(score)
      best = lax.pmax(score[local], DATA_AXES)
      winner = lax.pmin(jnp.where(score[local] == best, rows[local], n), DATA_AXES)
      local_id = winner - rows[0]
      mine = (local_id >= 0) & (local_id < per_shard)
      row = jnp.where(mine, x[jnp.clip(local_id, 0, per_shard - 1)], 0.0)
      return lax.psum(row, DATA_AXES)  # one shard contributes, the rest add zeros

    def body(t, state):
      centroids, min_sq = state
      c = pick(t, min_sq)
      diff = x - c[None, :]
      return centroids.at[t].set(c), jnp.minimum(min_sq, jnp.sum(diff * diff, axis=1))

    init = (jnp.zeros((k, x.shape[1]), jnp.float32), jnp.ones((per_shard,), jnp.float32))
    centroids, _ = lax.fori_loop(0, k, body, init)
    return centroids

  return jax.jit(jax.shard_map(shard_fn, mesh=mesh, in_specs=(P(DATA_AXES), P(), P()),
                               out_specs=P(), check_vma=False))


def kmeans_plus_plus(x_sharded: jax.Array, num_valid: int, mesh: Mesh, layout: RowLayout,
                     k: int, seed: int) -> np.ndarray:
  """k-means++ (D^2 sampling) over the first ``num_valid`` rows; O(k*N*d/devices) time."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x2B)
  return np.asarray(_kmeanspp_fn(mesh, layout, k)(x_sharded, jnp.int32(num_valid), key))
