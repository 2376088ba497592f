"""Lloyd's k-means, sharded over every device of the mesh (paper §4.2, DeepCluster).

Per iteration, inside ``jax.shard_map`` over ``DATA_AXES``:

1. each shard walks its rows ``chunk`` at a time (``lax.scan``): nearest centroid
   (one [chunk, k] block of scores at a time, so memory is
   O(N*d/devices + k*d + chunk*k)), then scatter-adds the rows into per-cluster
   sums and counts; padding rows are masked out by their global row id;
2. sums and counts are ``lax.psum``-reduced; every shard computes the same means;
3. empty clusters are split as in the reference (below).

After ``num_iters`` iterations one more assignment pass gives the labels, sizes and
the objective (sum of squared distances: scikit-learn's ``inertia_``).

Determinism: the sums are exact integers (``fixed_point``), so centroids are
bit-identical for any device count or chunk size; scores per (row, centroid) do not
depend on the rest of the chunk. Hence the same seed gives the same assignments on
1 or 8 devices. Randomness (init, splits) comes from the seed only.

Empty clusters: in index order, each empty cluster ``j`` takes a non-empty cluster
``m`` drawn with probability proportional to its size (big clusters are the ones
worth splitting, and a size-1 cluster cannot be split), copies its centroid as
``c_m + eps`` while ``c_m`` becomes ``c_m - eps`` (eps = 1e-7 per coordinate, or one
float32 ulp where 1e-7 would vanish), and takes half of ``m``'s count for the next
draws. The next assignment splits ``m``'s points between the two copies.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from deeper_jax.clustering import assign, checks, fixed_point, init as init_lib
from deeper_jax.clustering.layout import RowLayout, plan_rows, put_rows, resolve_mesh, scan_chunks
from deeper_jax.parallel import DATA_AXES, replicated

SPLIT_EPS = 1e-7
# Rows per assignment block at most (also capped by ``chunk_size``): the [rows, 1024]
# score block then stays in cache; measured fastest (benchmarks/README.md).
MAX_BLOCK_ROWS = 512
# Rows summed between two carries of the fixed-point low words.
CARRY_ROWS = 8192


class KMeansResult(NamedTuple):
  centroids: np.ndarray    # [k, d] float32, the centroids of the final assignment
  assignments: np.ndarray  # [N] int32 in [0, k)
  objective: float         # sum over points of squared distance to their centroid
  sizes: np.ndarray        # [k] int32, points per cluster


def split_empty_clusters(centroids: jax.Array, counts: jax.Array, key: jax.Array) -> jax.Array:
  """Replaces every empty cluster by a perturbed copy of a random non-empty one."""
  k = counts.shape[0]
  empty_ids = jnp.nonzero(counts == 0, size=k, fill_value=0)[0]

  def body(i, state):
    c, cnt = state
    j = empty_ids[i]
    logits = jnp.where(cnt > 0, jnp.log(jnp.maximum(cnt, 1).astype(jnp.float32)), -jnp.inf)
    m = jax.random.categorical(jax.random.fold_in(key, j), logits)
    base = c[m]
    ulp = jnp.abs(jnp.nextafter(jnp.abs(base), jnp.inf) - jnp.abs(base))
    eps = jnp.maximum(SPLIT_EPS, ulp)
    half = cnt[m] // 2
    c = c.at[j].set(base + eps).at[m].set(base - eps)
    return c, cnt.at[j].set(half).at[m].add(-half)

  centroids, _ = lax.fori_loop(0, jnp.sum(counts == 0), body, (centroids, counts))
  return centroids


def _carry_period(layout: RowLayout) -> int:
  """Chunks between two carries of the low words (carrying costs O(k*d))."""
  return max(1, CARRY_ROWS // layout.chunk)


def _assign_shard(x, centroids, scale, num_valid, *, layout: RowLayout, low_bits: int,
                  sums: bool):
  """One pass over this shard's rows, chunk by chunk.

  Returns per-row (assignment, squared distance) [R] and the shard's per-cluster
  counts (and exact fixed-point sums when ``sums``). Rows with a global id
  ``>= num_valid`` (a traced scalar, so one compilation serves any N up to the
  padded size) are padding and count nowhere.
  """
  k, d = centroids.shape
  fmt = fixed_point.FixedPointFormat(scale, low_bits, 0)
  tiles = assign.tile_centroids(centroids)
  period = _carry_period(layout)

  def body(carry, xi, rows, fresh, i):
    a = assign.nearest(xi, tiles)
    valid = fresh & (rows < num_valid)
    dist = jnp.where(rows < num_valid, assign.sq_distance(xi, centroids, a), 0.0)
    target = jnp.where(valid, a, k)  # k is out of range: the scatters drop it
    new = {"counts": carry["counts"].at[target].add(1, mode="drop"),
           "objective": carry["objective"] + jnp.sum(jnp.where(valid, dist, 0.0))}
    if sums:
      high, low = fixed_point.encode(xi, fmt)
      new["high"], new["low"] = lax.cond(
          i % period == period - 1,
          lambda h, l: fixed_point.normalise(h, l, low_bits), lambda h, l: (h, l),
          carry["high"].at[target].add(high, mode="drop"),
          carry["low"].at[target].add(low, mode="drop"))
    return new, (a, dist)

  carry = {"counts": jnp.zeros((k,), jnp.int32), "objective": jnp.zeros((), jnp.float32)}
  if sums:
    carry["high"] = jnp.zeros((k, d), jnp.int32)
    carry["low"] = jnp.zeros((k, d), jnp.int32)
  carry, (a, dist) = scan_chunks(body, carry, x, layout)
  return a, dist, carry


@functools.lru_cache(maxsize=32)
def _kernels(mesh: Mesh, layout: RowLayout, low_bits: int):
  """Jitted (step, final) functions for one mesh and row layout."""
  rows, rep = P(DATA_AXES), P()

  def step_shard(x, centroids, scale, num_valid, key):
    _, _, acc = _assign_shard(x, centroids, scale, num_valid, layout=layout, low_bits=low_bits,
                              sums=True)
    acc["high"], acc["low"] = fixed_point.normalise(acc["high"], acc["low"], low_bits)
    acc = lax.psum(acc, DATA_AXES)  # int32 sums and counts: exact in any order
    high, low = fixed_point.normalise(acc["high"], acc["low"], low_bits)
    fmt = fixed_point.FixedPointFormat(scale, low_bits, 0)
    means = fixed_point.decode_means(high, low, acc["counts"], fmt)
    new = jnp.where((acc["counts"] > 0)[:, None], means, centroids)
    new = split_empty_clusters(new, acc["counts"], key)
    return new, acc["objective"], jnp.sum(acc["counts"] == 0)

  def final_shard(x, centroids, scale, num_valid):
    a, dist, acc = _assign_shard(x, centroids, scale, num_valid, layout=layout,
                                 low_bits=low_bits, sums=False)
    return a, dist, lax.psum(acc["counts"], DATA_AXES)

  step = jax.jit(jax.shard_map(step_shard, mesh=mesh, in_specs=(rows, rep, rep, rep, rep),
                               out_specs=(rep, rep, rep), check_vma=False))
  final = jax.jit(jax.shard_map(final_shard, mesh=mesh, in_specs=(rows, rep, rep, rep),
                                out_specs=(rows, rows, rep), check_vma=False))
  return step, final


@jax.jit
def _column_abs_max(x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x), axis=0)  # max is exact in any order; padding rows are 0


def kmeans(x, k: int, *, num_iters: int = 10, seed: int = 0, init: str = "random",
           chunk_size: int = 8192, mesh: Mesh | None = None, init_centroids=None,
           progress: Callable[[int, float], None] | None = None,
           num_valid: int | None = None) -> KMeansResult:
  """Clusters the rows of ``x`` [N, d] into ``k`` clusters with Lloyd's algorithm.

  Args:
    x: numpy or jax array [N, d] of finite features (cast to float32).
    k: number of clusters, ``1 <= k <= N``.
    num_iters: Lloyd iterations (assign + update) before the final assignment.
    seed: drives initialisation and empty-cluster splits; same seed, same result.
    init: ``'random'`` (distinct random data points, the paper) or ``'kmeans++'``.
    chunk_size: rows per assignment block on each device (memory ~ chunk * k).
    mesh: device mesh (default: all devices); rows are split over ``DATA_AXES``.
    init_centroids: optional [k, d] starting centroids; overrides ``init``.
    progress: optional ``fn(iteration, objective)`` called after every iteration
      with the objective of that iteration's assignment (also logged with
      ``absl.logging.vlog(1)``).
    num_valid: cluster only the first ``num_valid`` rows; the rest of ``x`` is
      padding. Compiled kernels depend on ``x.shape`` only, so callers whose N
      varies (level 2 of hierarchical k-means) pad to a few sizes and reuse them.
  """
  rows, d = checks.check_features(x, "x")
  n = rows
  if num_valid is not None:
    if not isinstance(num_valid, (int, np.integer)) or not 1 <= num_valid <= rows:
      raise ValueError(f"num_valid must be an integer in [1, {rows}], got {num_valid!r}.")
    n = int(num_valid)
  checks.check_num_clusters(k, n)
  checks.check_init(init)
  checks.check_positive(chunk_size, "chunk_size")
  if not isinstance(num_iters, (int, np.integer)) or num_iters < 0:
    raise ValueError(f"num_iters must be an integer >= 0, got {num_iters!r}.")
  if init_centroids is not None:
    init_centroids = checks.check_centroids(init_centroids, k, d)

  mesh = resolve_mesh(mesh)
  layout = plan_rows(rows, mesh.size, min(chunk_size, MAX_BLOCK_ROWS))
  xs = put_rows(x, mesh, layout)
  fmt = fixed_point.choose_format(np.asarray(_column_abs_max(xs)), n,
                                  layout.chunk * _carry_period(layout))
  if init_centroids is not None:
    centroids = init_centroids
  elif init == "random":
    centroids = init_lib.random_points(x[:n], k, seed)
  else:
    centroids = init_lib.kmeans_plus_plus(xs, n, mesh, layout, k, seed)
  # Replicated from the start, as the step returns it: one compilation, not two.
  centroids = jax.device_put(np.asarray(centroids, np.float32), replicated(mesh))

  step, final = _kernels(mesh, layout, fmt.low_bits)
  key = jax.random.PRNGKey(seed)
  valid = jax.device_put(np.int32(n), replicated(mesh))
  for it in range(num_iters):
    centroids, objective, num_empty = step(xs, centroids, fmt.scale, valid,
                                           jax.random.fold_in(key, it))
    if progress is not None or logging.vlog_is_on(1):
      objective = float(objective)
      logging.vlog(1, "k-means iteration %d/%d: objective %.6g, %d empty clusters split",
                   it + 1, num_iters, objective, int(num_empty))
      if progress is not None:
        progress(it, objective)
  a, dist, sizes = final(xs, centroids, fmt.scale, valid)
  dist = np.asarray(dist)[:n]
  return KMeansResult(centroids=np.asarray(centroids), assignments=np.asarray(a)[:n],
                      objective=float(np.sum(dist, dtype=np.float64)),
                      sizes=np.asarray(sizes))
