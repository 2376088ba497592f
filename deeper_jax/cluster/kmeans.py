"""Lloyd's k-means, sharded over every device of the mesh (paper §4.2, DeepCluster).

Rows of ``x`` are split over all devices (``rows_sharding``); the kernels in
lloyd.py run inside ``jax.shard_map`` over ``DATA_AXES``. An iteration:

1. update: each shard's exact per-cluster sums and counts are ``lax.psum``-reduced
   over ``DATA_AXES`` and every shard computes the same new centroids;
2. empty clusters are split as in the reference (below);
3. reassign: each shard finds the nearest centroid of its rows, ``chunk`` rows by
   ~1024 centroids at a time (no N x k matrix ever exists), skipping rows that
   provably keep their cluster (exact; lloyd.py), and moves the rows that change
   cluster between the integer sums. Padding rows are masked by global row id.

Memory per device: O(N*(d + t)/devices + k*d + chunk*k), t <= 64 bound groups.
Given :class:`~deeper_jax.cluster.layout.Rows` (features already split over the
devices of every process), no process ever holds more than its own rows; the
labels and per-row distances ([N] each) are all-gathered to every process at the end.
After ``num_iters`` iterations the assignment is final (the last reassign is the
"final assignment pass"); it gives labels, sizes and the objective (sum of squared
distances: scikit-learn's ``inertia_``).

Determinism: the sums are exact integers (``fixed_point``), so centroids are
bit-identical for any device count or chunk size; scores per (row, centroid) do not
depend on the rest of the chunk. Hence the same seed gives the same assignments on
1 or 8 devices. Randomness (init, splits) comes from the seed only.

Empty clusters: in id order (of the internal, spatially sorted ids), each empty
cluster ``j`` takes a non-empty cluster ``m`` drawn with probability proportional to
its size (big clusters are the ones worth splitting, and a size-1 cluster cannot be
split), copies its centroid as ``c_m + eps`` while ``c_m`` becomes ``c_m - eps``
(eps = 1e-7 per coordinate, or one float32 ulp where 1e-7 would vanish), and takes
half of ``m``'s count for the next draws. The next assignment splits ``m``'s points
between the two copies. Draws use the seed and the cluster id: deterministic.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from deeper_jax.cluster import assign, checks, fixed_point, init as init_lib, lloyd, spill
from deeper_jax.cluster import streamed
from deeper_jax.cluster.layout import Rows, plan_rows, put_rows, resolve_mesh, to_hosts
from deeper_jax.runtime.mesh import replicated

# Rows per assignment block at most (also capped by ``chunk_size``). Besides the GEMM,
# each block of the pruned passes runs ~40 small ops (bounds, gathers, scatters) whose
# fixed cost 2048-row blocks halve: at (200k, 128, 10k) 2.36-2.60 vs 2.63-2.74 s/iter
# with 1024; a tie at (100k, 256, 1k) (benchmarks/README.md, k-means).
MAX_BLOCK_ROWS = 2048


class KMeansResult(NamedTuple):
  centroids: np.ndarray    # [k, d] float32, the centroids of the final assignment
  assignments: np.ndarray  # [N] int32 in [0, k)
  objective: float         # sum over points of squared distance to their centroid
  sizes: np.ndarray        # [k] int32, points per cluster


@jax.jit
def _column_abs_max(x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x), axis=0)  # max is exact in any order; padding rows are 0


def kmeans(x, k: int, *, num_iters: int = 10, seed: int = 0, init: str = "random",
           chunk_size: int = 8192, mesh: Mesh | None = None, init_centroids=None,
           progress: Callable[[int, float], None] | None = None,
           num_valid: int | None = None, prune: bool = True) -> KMeansResult:
  """Clusters the rows of ``x`` [N, d] into ``k`` clusters with Lloyd's algorithm.

  Args:
    x: numpy or jax array [N, d] of finite features (cast to float32), or
      :class:`Rows` split over the mesh's devices (the multi-process case), or
      :class:`~deeper_jax.cluster.spill.Spilled` rows on disk (streamed.py: the
      same result, one pass over the files per iteration).
    k: number of clusters, ``1 <= k <= N``.
    num_iters: Lloyd iterations (assign + update) before the final assignment.
    seed: drives initialisation and empty-cluster splits; same seed, same result.
    init: ``'random'`` (distinct random data points, the paper) or ``'kmeans++'``.
    chunk_size: most rows per assignment block on each device (temporaries ~
      chunk * 1024 scores); also capped at ``MAX_BLOCK_ROWS``, measured fastest.
    mesh: device mesh (default: all devices); rows are split over ``DATA_AXES``.
    init_centroids: optional [k, d] starting centroids; overrides ``init``.
    progress: optional ``fn(iteration, objective)`` called after every iteration
      with the objective of that iteration's assignment (also logged with
      ``absl.logging.vlog(1)``).
    num_valid: cluster only the first ``num_valid`` rows; the rest of ``x`` is
      padding. Compiled kernels depend on ``x.shape`` only, so callers whose N
      varies (level 2 of hierarchical k-means) pad to a few sizes and reuse them.
    prune: skip the work that provably cannot change an assignment (lloyd.py);
      ``False`` scores every row against every centroid in every pass (plain
      Lloyd, same result; for tests and for checking a new backend).
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

  if isinstance(x, spill.Spilled):  # rows on disk: one streamed pass per iteration
    return streamed.kmeans(x, k, n=n, num_iters=num_iters, seed=seed, init=init,
                           chunk_size=chunk_size, init_centroids=init_centroids,
                           progress=progress)
  mesh = x.mesh if isinstance(x, Rows) else resolve_mesh(mesh)
  layout = plan_rows(rows, mesh.size, min(chunk_size, MAX_BLOCK_ROWS))
  xs = put_rows(x, mesh, layout)
  # Sums follow rows in and out of clusters: up to 2 * chunk * period row updates
  # between two carries, and transiently a chunk more than N rows in the sums.
  fmt = fixed_point.choose_format(np.asarray(_column_abs_max(xs)), n + 2 * layout.chunk,
                                  2 * layout.chunk * lloyd.carry_period(layout))
  if init_centroids is not None:
    centroids = init_centroids
  elif init == "random":
    centroids = init_lib.random_points(x if isinstance(x, Rows) else x[:n], k, seed,
                                       num_rows=n)
  else:
    centroids = init_lib.kmeans_plus_plus(xs, n, mesh, layout, k, seed)
  # Internally, centroids are ordered so that runs of ids are close in space (the
  # bound groups of lloyd.py); results are reported in the original order.
  spec = assign.tile_spec(k)
  order = init_lib.spatial_order(np.asarray(centroids, np.float32), spec.bound_group)
  # Replicated from the start, as ``update`` returns them: one compilation, not two.
  rep = replicated(mesh)
  centroids = jax.device_put(np.asarray(centroids, np.float32)[order], rep)

  reassign, update, objective_of = lloyd.kernels(mesh, layout, spec, fmt.low_bits, prune)
  valid = jax.device_put(np.int32(n), rep)
  state, _ = reassign(xs, centroids, jax.device_put(np.full(k, np.inf, np.float32), rep),
                      lloyd.initial_state(mesh, layout, spec, k, d), fmt.scale, valid)
  key = jax.random.PRNGKey(seed)
  verbose = progress is not None or logging.vlog_is_on(1)
  for it in range(num_iters):
    objective = objective_of(xs, state, centroids, valid)[0] if verbose else None
    centroids, shift = update(state, centroids, fmt.scale, jax.random.fold_in(key, it))
    state, work = reassign(xs, centroids, shift, state, fmt.scale, valid)
    if verbose:
      skipped, challenged, scored = np.asarray(work)
      logging.vlog(1, "k-means iteration %d/%d: objective %.6g; %d centroids moved; rows "
                   "skipped %d, checked against moved centroids %d, fully scored %d",
                   it + 1, num_iters, float(objective), int(jnp.sum(shift > 0)), skipped,
                   challenged, scored)
      if progress is not None:
        progress(it, float(objective))
  _, dist, sizes = objective_of(xs, state, centroids, valid)
  dist = to_hosts(dist)[:n]
  out_centroids = np.empty((k, d), np.float32)
  out_centroids[order] = np.asarray(centroids)
  out_sizes = np.empty(k, np.int32)
  out_sizes[order] = np.asarray(sizes)
  return KMeansResult(centroids=out_centroids,
                      assignments=order[to_hosts(state["a"])[:n]].astype(np.int32),
                      objective=float(np.sum(dist, dtype=np.float64)), sizes=out_sizes)
