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
from deeper_jax.clustering.layout import RowLayout, chunk_rows, plan_rows, put_rows, resolve_mesh
from deeper_jax.parallel import DATA_AXES

SPLIT_EPS = 1e-7


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


def _assign_shard(x, centroids, scale, *, layout: RowLayout, low_bits: int, sums: bool):
  """One pass over this shard's rows, chunk by chunk.

  Returns per-row (assignment, squared distance) [R] and the shard's per-cluster
  counts (and exact fixed-point sums when ``sums``); padding rows count nowhere.
  """
  k, d = centroids.shape
  fmt = fixed_point.FixedPointFormat(scale, low_bits, 0)
  neg2, sq_norms = assign.centroid_terms(centroids)
  chunks = x.reshape(layout.chunks_per_shard, layout.chunk, d)

  def body(carry, inputs):
    xi, i = inputs
    a = assign.nearest(xi, neg2, sq_norms)
    valid = chunk_rows(layout, i) < layout.num_rows
    dist = jnp.where(valid, assign.sq_distance(xi, centroids, a), 0.0)
    target = jnp.where(valid, a, k)  # k is out of range: the scatters drop it
    counts = carry["counts"].at[target].add(1, mode="drop")
    new = {"counts": counts, "objective": carry["objective"] + jnp.sum(dist)}
    if sums:
      high, low = fixed_point.encode(xi, fmt)
      new["high"], new["low"] = fixed_point.normalise(
          carry["high"].at[target].add(high, mode="drop"),
          carry["low"].at[target].add(low, mode="drop"), low_bits)
    return new, (a, dist)

  carry = {"counts": jnp.zeros((k,), jnp.int32), "objective": jnp.zeros((), jnp.float32)}
  if sums:
    carry["high"] = jnp.zeros((k, d), jnp.int32)
    carry["low"] = jnp.zeros((k, d), jnp.int32)
  steps = jnp.arange(layout.chunks_per_shard, dtype=jnp.int32)
  carry, (a, dist) = lax.scan(body, carry, (chunks, steps))
  return a.reshape(-1), dist.reshape(-1), carry


@functools.lru_cache(maxsize=32)
def _kernels(mesh: Mesh, layout: RowLayout, low_bits: int):
  """Jitted (step, final) functions for one mesh and row layout."""
  rows, rep = P(DATA_AXES), P()

  def step_shard(x, centroids, scale, key):
    _, _, acc = _assign_shard(x, centroids, scale, layout=layout, low_bits=low_bits, sums=True)
    acc = lax.psum(acc, DATA_AXES)  # int32 sums and counts: exact in any order
    high, low = fixed_point.normalise(acc["high"], acc["low"], low_bits)
    fmt = fixed_point.FixedPointFormat(scale, low_bits, 0)
    means = fixed_point.decode_means(high, low, acc["counts"], fmt)
    new = jnp.where((acc["counts"] > 0)[:, None], means, centroids)
    new = split_empty_clusters(new, acc["counts"], key)
    return new, acc["objective"], jnp.sum(acc["counts"] == 0)

  def final_shard(x, centroids, scale):
    a, dist, acc = _assign_shard(x, centroids, scale, layout=layout, low_bits=low_bits,
                                 sums=False)
    return a, dist, lax.psum(acc["counts"], DATA_AXES)

  step = jax.jit(jax.shard_map(step_shard, mesh=mesh, in_specs=(rows, rep, rep, rep),
                               out_specs=(rep, rep, rep), check_vma=False))
  final = jax.jit(jax.shard_map(final_shard, mesh=mesh, in_specs=(rows, rep, rep),
                                out_specs=(rows, rows, rep), check_vma=False))
  return step, final


@jax.jit
def _column_abs_max(x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x), axis=0)  # max is exact in any order; padding rows are 0


def kmeans(x, k: int, *, num_iters: int = 10, seed: int = 0, init: str = "random",
           chunk_size: int = 8192, mesh: Mesh | None = None, init_centroids=None,
           progress: Callable[[int, float], None] | None = None) -> KMeansResult:
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
      with the objective of that iteration's assignment (also logged at INFO).
  """
  n, d = checks.check_features(x, "x")
  checks.check_num_clusters(k, n)
  checks.check_init(init)
  checks.check_positive(chunk_size, "chunk_size")
  if not isinstance(num_iters, (int, np.integer)) or num_iters < 0:
    raise ValueError(f"num_iters must be an integer >= 0, got {num_iters!r}.")
  if init_centroids is not None:
    init_centroids = checks.check_centroids(init_centroids, k, d)

  mesh = resolve_mesh(mesh)
  layout = plan_rows(n, mesh.size, chunk_size)
  xs = put_rows(x, mesh, layout)
  fmt = fixed_point.choose_format(np.asarray(_column_abs_max(xs)), n, layout.chunk)
  if init_centroids is not None:
    centroids = init_centroids
  elif init == "random":
    centroids = init_lib.random_points(x, k, seed)
  else:
    centroids = init_lib.kmeans_plus_plus(xs, mesh, layout, k, seed)
  centroids = jnp.asarray(centroids, jnp.float32)

  step, final = _kernels(mesh, layout, fmt.low_bits)
  key = jax.random.PRNGKey(seed)
  for it in range(num_iters):
    centroids, objective, num_empty = step(xs, centroids, fmt.scale, jax.random.fold_in(key, it))
    if progress is not None or logging.vlog_is_on(1):
      objective = float(objective)
      logging.vlog(1, "k-means iteration %d/%d: objective %.6g, %d empty clusters split",
                   it + 1, num_iters, objective, int(num_empty))
      if progress is not None:
        progress(it, objective)
  a, dist, sizes = final(xs, centroids, fmt.scale)
  dist = np.asarray(dist)[:n]
  return KMeansResult(centroids=np.asarray(centroids), assignments=np.asarray(a)[:n],
                      objective=float(np.sum(dist, dtype=np.float64)),
                      sizes=np.asarray(sizes))
