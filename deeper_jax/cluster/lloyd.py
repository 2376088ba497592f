"""The sharded kernels of Lloyd's algorithm: ``reassign``, ``update``, ``objective``.

All run inside ``jax.shard_map`` over ``DATA_AXES``; kmeans.py alternates
``update`` (new centroids) and ``reassign`` (new assignments). The state lives on
the shards: per row, the assignment ``a``, its score ``best``, whether ``best`` is
still exact, and per-group lower bounds; per shard, the exact fixed-point sums and
counts of its rows per cluster (``fixed_point``).

``reassign`` finds the nearest centroid of every row, ``chunk`` rows by ~1024
centroids at a time (no N x k matrix), and skips work that cannot change the
answer. Both skips give exactly the plain-Lloyd assignment (tested: on == off):

1. Bounds (Yinyang k-means, Ding et al. 2015): centroids are ordered so that runs
   of ids are close in space (init.spatial_order); per row and run ("bound group")
   a lower bound on the distance to the group's other centroids is kept and
   lowered by the group's largest move after each update (triangle inequality).
   If the exact distance to the row's own centroid is below every bound by more
   than twice the worst-case error of a computed score (``_score_error``: d*2^-24
   of (||x|| + max||c||)^2, x4, for XLA's float32 dot), the own centroid is still the
   argmin of the computed scores and the row is skipped. The bounds come from the group minima the two-level argmin
   computes anyway.
2. Unmoved centroids: if a row's own centroid did not move, every other unmoved
   centroid scores exactly what it scored last time, which was no better than
   ``best`` (ties to the lower id), so only the *moved* centroids (compacted into
   tiles of their own) are scored and compared with ``best`` in (score, id) order.
   At large k most centroids stop moving (about 75% at k=10k, N/k=20, by iteration
   10). This relies on a (row, centroid) score being the same bits in any block
   shape, which holds for XLA:CPU's dot (each score is one dot product over d).
   ``prune=False`` scores every row against every centroid in every pass (plain
   Lloyd) for backends where that may not hold.

Other rows are scored against all centroids. Rows go through compacted index lists
(``jnp.nonzero`` with a static size) in ``fori_loop``s whose trip counts are the
numbers of chunks actually needed, so a skipped row costs only its filter test.

Sums follow the rows: the rows that changed cluster are subtracted from the old
and added to the new cluster's integer sums, which stay exact, so ``update`` only
``psum``s the shards' sums (O(k*d), no pass over the rows), decodes the means,
splits empty clusters and reports how far each centroid moved. ``objective``
(squared distances, sizes) is a separate pass, run for progress lines and once at
the end.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from deeper_jax.cluster import assign, fixed_point
from deeper_jax.cluster.layout import RowLayout, scan_chunks, shard_index
from deeper_jax.runtime.mesh import DATA_AXES, rows_sharding

SPLIT_EPS = 1e-7
# Rows summed between two carries of the fixed-point low words.
CARRY_ROWS = 8192


def carry_period(layout: RowLayout) -> int:
  """Chunks between two carries of the low words (carrying costs O(k*d))."""
  return max(1, CARRY_ROWS // layout.chunk)


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


def _moved_tiles(tiles: assign.CentroidTiles, moved: jax.Array):
  """The moved centroids compacted to the front of tiles of the same shape.

  Returns (tiles, number of blocks holding them, original id of each slot). Norms
  are gathered, not recomputed, so every score is the same bits as in the full tiles.
  """
  blocks, per_block, d = tiles.neg2.shape
  k = moved.shape[0]
  ids = jnp.nonzero(moved, size=blocks * per_block, fill_value=k)[0]
  slot = jnp.minimum(ids, k - 1)
  neg2 = tiles.neg2.reshape(-1, d)[slot]
  sq = jnp.where(ids < k, tiles.sq_norms.reshape(-1)[slot], jnp.inf)
  num_blocks = -(-jnp.sum(moved) // per_block)
  return assign.CentroidTiles(neg2.reshape(blocks, per_block, d),
                              sq.reshape(blocks, per_block)), num_blocks, ids


def _score_error(sq_norm_x: jax.Array, c_max: jax.Array, d: int) -> jax.Array:
  """Bound on |computed score - exact score| for rows with ``||x||^2 = sq_norm_x``.

  A float32 dot product of d terms, in any summation order, errs by at most
  ``(d + 4) 2^-24 ||x|| ||c||`` (the +4 spares rounding of the norms); the norm
  ``||c||^2`` by less; 4x that, to spare.
  """
  return 4.0 * (d + 4) * 2.0**-24 * (jnp.sqrt(sq_norm_x) + c_max) ** 2


def _lower_bound(score: jax.Array, sq_norm_x: jax.Array, error: jax.Array) -> jax.Array:
  """A distance no larger than the exact distance behind a float ``score``."""
  return jnp.sqrt(jnp.maximum(score + sq_norm_x - error, 0.0)) * (1 - 2.0**-20)


def _reassign_shard(x, centroids, shift, state, scale, num_valid, *, layout: RowLayout,
                    spec: assign.TileSpec, low_bits: int, prune: bool):
  """New nearest centroids for this shard's rows; see the module docstring.

  ``state`` per row: ``a`` (assignment; ``k`` = none yet), ``best`` (its score),
  ``exact`` (``best`` is the current score of ``a``, bit for bit) and ``bounds``
  [R, groups] (a lower bound on the distance to every centroid of each bound group
  except ``a``); per shard: ``high``, ``low``, ``counts``, the exact fixed-point
  sums of the shard's rows per cluster, kept up to date as rows change cluster.
  ``shift`` [k]: how far each centroid moved since the last call (+inf: unknown).
  """
  per_shard, size = layout.rows_per_shard, layout.chunk
  k, d = centroids.shape
  fmt = fixed_point.FixedPointFormat(scale, low_bits, 0)
  period = carry_period(layout)
  tiles = assign.tile_centroids(centroids, spec)
  moved = shift > 0
  sub_tiles, sub_blocks, sub_ids = _moved_tiles(tiles, moved)
  c_max = jnp.sqrt(jnp.max(jnp.where(jnp.isfinite(tiles.sq_norms), tiles.sq_norms, 0.0)))
  pad = spec.blocks * spec.per_block - k
  group_shift = jnp.max(jnp.pad(shift, (0, pad)).reshape(spec.bound_groups, -1), axis=1)
  group_shift = group_shift * (1 + 2.0**-20)

  # Filter (Yinyang's global test): if the exact distance to the own centroid is
  # below every group's lower bound by more than the float error of a score, the
  # own centroid is still the float argmin: the row is skipped.
  def filter_body(carry, chunk, rows, fresh, _):
    xi, ai, bi = chunk
    sq_x = assign.row_sums(xi * xi)
    error = _score_error(sq_x, c_max, d)
    # Triangle inequality, rounded down; infinite bounds (nothing known, or a group
    # of padding slots) stay as they are.
    decayed = bi - group_shift[None, :] - 2.0**-22 * (jnp.abs(bi) + group_shift[None, :])
    bounds = jnp.where(jnp.isfinite(bi), decayed, bi)
    lowest = jnp.min(bounds, axis=1)
    upper = assign.sq_distance(xi, centroids, jnp.minimum(ai, k - 1)) * (1 + (d + 8) * 2.0**-24)
    keep = (ai < k) & (lowest > 0) & (upper + 2 * error < lowest * lowest * (1 - 2.0**-20))
    return carry, (keep & prune, bounds)

  _, (kept, bounds) = scan_chunks(filter_body, (), (x, state["a"], state["bounds"]), layout)
  rows = shard_index() * per_shard + jnp.arange(per_shard, dtype=jnp.int32)
  valid = rows < num_valid
  own_static = ~jnp.take(moved, state["a"], mode="fill", fill_value=True) & prune
  can_challenge = own_static & state["exact"]
  per_row = {"a": state["a"], "best": state["best"],
             "exact": state["exact"] & (own_static | ~kept), "bounds": bounds}
  sums = {name: state[name] for name in ("high", "low", "counts")}

  def process(mask, search, per_row):
    # Padding the list by one chunk of fill ids keeps every dynamic slice in range.
    ids = jnp.nonzero(mask, size=per_shard + size, fill_value=per_shard)[0]

    def body(step, per_row):
      idx = lax.dynamic_slice_in_dim(ids, step * size, size)
      safe = jnp.minimum(idx, per_shard - 1)
      xi = x[safe]
      sq_x = assign.row_sums(xi * xi)
      new = search(xi, sq_x, _score_error(sq_x, c_max, d),
                   {name: value[safe] for name, value in per_row.items()})
      return {name: per_row[name].at[idx].set(new[name], mode="drop") for name in per_row}

    return lax.fori_loop(0, -(-jnp.sum(mask) // size), body, per_row)

  def follow_changes(old_a, new_a, sums):
    """Moves the rows that changed cluster between the exact sums (id k: none)."""
    mask = valid & (old_a != new_a)
    ids = jnp.nonzero(mask, size=per_shard + size, fill_value=per_shard)[0]

    def body(step, sums):
      idx = lax.dynamic_slice_in_dim(ids, step * size, size)
      safe = jnp.minimum(idx, per_shard - 1)
      live = idx < per_shard
      into, out_of = jnp.where(live, new_a[safe], k), jnp.where(live, old_a[safe], k)
      high, low = fixed_point.encode(x[safe], fmt)
      high = sums["high"].at[into].add(high, mode="drop").at[out_of].add(-high, mode="drop")
      low = sums["low"].at[into].add(low, mode="drop").at[out_of].add(-low, mode="drop")
      high, low = lax.cond(step % period == period - 1,
                           lambda h, l: fixed_point.normalise(h, l, low_bits),
                           lambda h, l: (h, l), high, low)
      counts = sums["counts"].at[into].add(1, mode="drop").at[out_of].add(-1, mode="drop")
      return {"high": high, "low": low, "counts": counts}

    sums = lax.fori_loop(0, -(-jnp.sum(mask) // size), body, sums)
    sums["high"], sums["low"] = fixed_point.normalise(sums["high"], sums["low"], low_bits)
    return sums

  def full(xi, sq_x, error, old):
    a, best, mins = assign.nearest_with_bounds(xi, tiles, spec)
    return {"a": a, "best": best, "exact": jnp.ones_like(old["exact"]),
            "bounds": _lower_bound(mins, sq_x[:, None], error[:, None])}

  def challenge(xi, sq_x, error, old):
    # Unmoved centroids score what they scored last time: only moved ones can win.
    j, score = assign.nearest(xi, sub_tiles, spec, sub_blocks)
    j = sub_ids[j]  # slot in the compacted tiles -> centroid id (ascending: ties keep order)
    better = (score < old["best"]) | ((score == old["best"]) & (j < old["a"]))
    # The centroid left behind becomes one of "the others" of its bound group.
    left = old["a"] // spec.bound_group
    row = jnp.arange(xi.shape[0])
    bound = jnp.minimum(old["bounds"][row, left], _lower_bound(old["best"], sq_x, error))
    return {"a": jnp.where(better, j, old["a"]), "best": jnp.where(better, score, old["best"]),
            "exact": jnp.ones_like(old["exact"]),
            "bounds": old["bounds"].at[row, left].set(
                jnp.where(better, bound, old["bounds"][row, left]))}

  full_rows = valid & ~kept & ~can_challenge
  challenged = valid & ~kept & can_challenge & (sub_blocks > 0)
  per_row = process(challenged, challenge, process(full_rows, full, per_row))
  sums = follow_changes(state["a"], per_row["a"], sums)
  work = jnp.stack([jnp.sum(valid & kept), jnp.sum(challenged), jnp.sum(full_rows)])
  return dict(per_row, **sums), lax.psum(work, DATA_AXES)


def _update_shard(state, centroids, scale, key, *, low_bits: int):
  """New centroids from the shards' sums; every shard computes the same ones."""
  fmt = fixed_point.FixedPointFormat(scale, low_bits, 0)
  acc = lax.psum({name: state[name] for name in ("high", "low", "counts")}, DATA_AXES)
  high, low = fixed_point.normalise(acc["high"], acc["low"], low_bits)
  means = fixed_point.decode_means(high, low, acc["counts"], fmt)
  new = jnp.where((acc["counts"] > 0)[:, None], means, centroids)
  new = split_empty_clusters(new, acc["counts"], key)
  # How far each centroid moved, rounded up; scaled by the largest coordinate change
  # so that tiny moves cannot underflow to 0 (0 means: bit-identical scores).
  diff = new - centroids
  largest = jnp.max(jnp.abs(diff), axis=1)
  scaled = diff / jnp.where(largest > 0, largest, 1.0)[:, None]
  shift = largest * jnp.sqrt(assign.row_sums(scaled * scaled)) * (1 + 2.0**-20)
  return new, shift


def _objective_shard(x, state, centroids, num_valid, *, layout: RowLayout):
  """Per-row squared distances to the assigned centroids, their float sum, sizes."""
  k = centroids.shape[0]

  def body(total, chunk, rows, fresh, _):
    xi, ai = chunk
    dist = assign.sq_distance(xi, centroids, jnp.minimum(ai, k - 1))
    dist = jnp.where(rows < num_valid, dist, 0.0)
    return total + jnp.sum(jnp.where(fresh, dist, 0.0)), dist

  total, dist = scan_chunks(body, jnp.zeros((), jnp.float32), (x, state["a"]), layout)
  return lax.psum(total, DATA_AXES), dist, lax.psum(state["counts"], DATA_AXES)


@functools.lru_cache(maxsize=32)
def kernels(mesh: Mesh, layout: RowLayout, spec: assign.TileSpec, low_bits: int,
            prune: bool = True):
  """Jitted kernels for one mesh, row layout and centroid layout.

  * ``reassign(x, centroids, shift, state, scale, num_valid) -> (state, work)``
    (``state`` donated; ``work``: rows skipped by the bounds, checked against
    moved centroids only, scored in full);
  * ``update(state, centroids, scale, key) -> (centroids, shift)``;
  * ``objective(x, state, centroids, num_valid) -> (float sum, per-row squared
    distance, sizes)``: the float sum is for progress lines; the exact total is
    summed on the host from the per-row distances.

  ``prune=False`` scores every row against every centroid in every pass (plain
  Lloyd: the same results, kept for tests and benchmarks).
  """
  rows, rep = P(DATA_AXES), P()
  reassign = jax.jit(jax.shard_map(
      functools.partial(_reassign_shard, layout=layout, spec=spec, low_bits=low_bits,
                        prune=prune),
      mesh=mesh, in_specs=(rows, rep, rep, rows, rep, rep), out_specs=(rows, rep),
      check_vma=False), donate_argnums=3)
  update = jax.jit(jax.shard_map(
      functools.partial(_update_shard, low_bits=low_bits), mesh=mesh,
      in_specs=(rows, rep, rep, rep), out_specs=(rep, rep), check_vma=False))
  objective = jax.jit(jax.shard_map(
      functools.partial(_objective_shard, layout=layout), mesh=mesh,
      in_specs=(rows, rows, rep, rep), out_specs=(rep, rows, rep), check_vma=False))
  return reassign, update, objective


def initial_state(mesh: Mesh, layout: RowLayout, spec: assign.TileSpec, k: int, d: int) -> dict:
  """State before the first pass: no row assigned (id k), every row will be scored."""
  rows, shards = layout.padded_rows, layout.num_shards
  fills = {"a": ((rows,), k, np.int32), "best": ((rows,), np.inf, np.float32),
           "exact": ((rows,), False, bool),
           "bounds": ((rows, spec.bound_groups), -np.inf, np.float32),
           "high": ((shards * k, d), 0, np.int32), "low": ((shards * k, d), 0, np.int32),
           "counts": ((shards * k,), 0, np.int32)}

  def constant(shape, value, dtype):
    # Each process builds only its own shards (on many hosts no host holds all rows).
    def shard(index):
      return np.full(tuple(len(range(n)[i]) for n, i in zip(shape, index)), value, dtype)
    return jax.make_array_from_callback(shape, rows_sharding(mesh), shard)

  return {name: constant(*fill) for name, fill in fills.items()}
