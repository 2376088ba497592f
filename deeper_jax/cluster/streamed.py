"""Lloyd's k-means over spilled rows (cluster/spill.py), streamed from disk a chunk at a time.

What a process holds: one chunk of its rows, the centroids, per-cluster sums
``k x d``, and the assignment and distance of each of *its* rows (N/P values each);
never its N/P feature rows. Each Lloyd iteration is one pass over its files.

Why the clusters are those of the in-memory path (kmeans.py), bit for bit:

* the same initial centroids (``init.random_points`` reads the drawn rows from the
  files), in the same internal order, and the same fixed-point format (the same
  column maxima and the same ``plan_rows`` layout of the in-memory call);
* a pass scores every row against every centroid (plain Lloyd; the in-memory
  pruning is proved to give the plain-Lloyd assignment, lloyd.py), with the same
  tiles and ties to the lower id, each (row, centroid) score the same bits in any
  block shape (XLA:CPU's dot; the same assumption lloyd.py makes);
* the per-cluster sums are exact integers (fixed_point.py), so summing them per
  chunk on the host and once across processes gives the totals the in-memory
  shards keep, and the centroids, empty-cluster splits and shifts come from the
  very same ``update`` kernel (lloyd.kernels), fed each process's totals in the
  slot of its first device.

Only ``init='random'`` (the paper's) streams; k-means++ needs passes over all rows
per centroid and is refused (config_checks.py says so up front).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from deeper_jax.cluster import assign, fixed_point, init as init_lib, lloyd, spill
from deeper_jax.cluster.layout import plan_rows, to_hosts
from deeper_jax.runtime.mesh import replicated, rows_sharding


@functools.lru_cache(maxsize=32)
def _pass_fn(k: int, spec: assign.TileSpec, low_bits: int):
  """Jitted ``(x [c, d], valid [c], centroids, scale) -> (a, dist, high, low, counts)``."""

  @jax.jit
  def run(x, valid, centroids, scale):
    fmt = fixed_point.FixedPointFormat(scale, low_bits, 0)
    a, _ = assign.nearest(x, assign.tile_centroids(centroids, spec), spec)
    dist = assign.sq_distance(x, centroids, a)
    high, low = fixed_point.encode(x, fmt)
    into = jnp.where(valid, a, k)
    zeros = jnp.zeros((k, x.shape[1]), jnp.int32)
    return (a, dist, zeros.at[into].add(high, mode="drop"), zeros.at[into].add(low, mode="drop"),
            jnp.zeros((k,), jnp.int32).at[into].add(1, mode="drop"))

  return run


def _padded_chunks(x: spill.Spilled, chunk: int):
  """``(rows, block [chunk, d], valid [chunk])`` of this process's rows, zero-padded."""
  for rows, block in x.chunks(chunk):
    padded = np.zeros((chunk, x.dim), np.float32)
    padded[:len(rows)] = block
    yield rows, padded, np.arange(chunk) < len(rows)


def _column_abs_max(x: spill.Spilled, chunk: int) -> np.ndarray:
  """Largest |value| per column over every process's selected rows (one pass)."""
  out = np.zeros(x.dim, np.float32)
  for _, block in x.chunks(chunk):
    if not np.isfinite(block).all():
      raise ValueError("x contains NaN or inf values; remove or repair those rows first.")
    out = np.maximum(out, np.abs(block).max(axis=0))
  if jax.process_count() > 1:
    out = np.asarray(multihost_utils.process_allgather(out)).max(axis=0)
  return out


def _per_row_to_hosts(x: spill.Spilled, values: list[tuple[np.ndarray, np.ndarray]], fill,
                      dtype) -> np.ndarray:
  """A per-row vector known by each process for its own rows, on every process [len(x)]."""
  r, mesh = x.rows_per_shard, x.mesh
  full = np.full(mesh.size * r, fill, dtype)
  for rows, value in values:
    full[rows] = value
  array = jax.make_array_from_callback(
      (mesh.size * r,), rows_sharding(mesh), lambda index: full[index[0]])
  out = to_hosts(array)[:x.num_rows]
  return out if x.ids is None else out[x.ids]


def kmeans(x: spill.Spilled, k: int, *, n: int, num_iters: int, seed: int, init: str,
           chunk_size: int, init_centroids=None, progress=None):
  """:func:`~deeper_jax.cluster.kmeans.kmeans` of spilled rows (arguments checked there)."""
  from deeper_jax.cluster.kmeans import MAX_BLOCK_ROWS, KMeansResult  # pylint: disable=g-import-not-at-top
  if init_centroids is None and init != "random":
    raise ValueError(f"init={init!r} cannot stream over spilled rows; use init='random'.")
  mesh, d = x.mesh, x.dim
  # The fixed-point format of the in-memory call on the same rows.
  layout = plan_rows(x.shape[0], mesh.size, min(chunk_size, MAX_BLOCK_ROWS))
  period_rows = 2 * layout.chunk * lloyd.carry_period(layout)
  # Rows per streamed chunk: the in-memory block (<= MAX_BLOCK_ROWS), which also keeps
  # one chunk's low-word sums within int32 (choose_format allows period_rows).
  chunk = layout.chunk
  fmt = fixed_point.choose_format(_column_abs_max(x, chunk), n + 2 * layout.chunk, period_rows)
  centroids = (init_centroids if init_centroids is not None
               else init_lib.random_points(x, k, seed, num_rows=n))
  spec = assign.tile_spec(k)
  order = init_lib.spatial_order(np.asarray(centroids, np.float32), spec.bound_group)
  rep = replicated(mesh)
  centroids = jax.device_put(np.asarray(centroids, np.float32)[order], rep)
  _, update, _ = lloyd.kernels(mesh, layout, spec, fmt.low_bits)
  run = _pass_fn(k, spec, fmt.low_bits)
  device = mesh.local_devices[0]
  scale = jax.device_put(fmt.scale, device)
  first_shard = x.own_shards()[0]

  def stream(centroids):
    """One pass: (this process's sums as update's state, {rows: a}, {rows: dist})."""
    local = jax.device_put(np.asarray(centroids), device)
    total = np.zeros((k, d), np.int64)
    counts = np.zeros(k, np.int64)
    labels, dists = [], []
    for rows, block, valid in _padded_chunks(x, chunk):
      a, dist, high, low, count = jax.device_get(
          run(jax.device_put(block, device), jax.device_put(valid, device), local, scale))
      total += (high.astype(np.int64) << fmt.low_bits) + low
      counts += count
      labels.append((rows, a[:len(rows)]))
      dists.append((rows, dist[:len(rows)]))
    high = (total >> fmt.low_bits).astype(np.int32)
    low = (total & ((1 << fmt.low_bits) - 1)).astype(np.int32)
    sums = {"high": high, "low": low, "counts": counts.astype(np.int32)}

    def slot(name):
      value = sums[name]
      def block(index):
        shard = (index[0].start or 0) // k
        return value if shard == first_shard else np.zeros_like(value)
      return jax.make_array_from_callback((mesh.size * k,) + value.shape[1:],
                                          rows_sharding(mesh), block)

    state = {name: slot(name) for name in sums}
    return state, labels, dists

  key = jax.random.PRNGKey(seed)
  state, labels, dists = stream(centroids)
  for it in range(num_iters):
    if progress is not None:
      progress(it, float(sum(np.sum(v, dtype=np.float64) for _, v in dists)))
    centroids, _ = update(state, centroids, fmt.scale, jax.random.fold_in(key, it))
    state, labels, dists = stream(centroids)

  assignments = _per_row_to_hosts(x, labels, k, np.int32)
  distances = _per_row_to_hosts(x, dists, 0.0, np.float32)
  out_centroids = np.empty((k, d), np.float32)
  out_centroids[order] = np.asarray(centroids)
  sizes = np.bincount(assignments, minlength=k).astype(np.int32)
  out_sizes = np.empty(k, np.int32)
  out_sizes[order] = sizes
  return KMeansResult(centroids=out_centroids, assignments=order[assignments].astype(np.int32),
                      objective=float(np.sum(distances, dtype=np.float64)), sizes=out_sizes)
