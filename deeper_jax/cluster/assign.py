"""Nearest centroid of each row of a block: the only O(rows * k * d) work in k-means.

Scores: ``||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c)``. The bracket is one matrix
product plus a broadcast add; ``||x||^2`` is the same for every centroid, so the
argmin ignores it. Exact distances are recomputed directly as ``sum((x - c_a)^2)``.
The product is XLA's float32 dot: the same code on CPU, GPU and TPU.

Speed (measured, see benchmarks/README.md "k-means"): XLA:CPU fuses
``dot + add + min`` into one fast kernel, but ``argmin`` is a variadic
(value, index) reduction that it runs as scalar code, costing as much again as the
product. So the argmin is two-level: centroids are tiled in blocks of ~1024
(padding scores +inf) split into groups of ``group`` ids; the cheap vectorised
``min`` over each group gives group minima, ``argmin`` runs only over the groups
and then inside the winning group: ``groups + group`` scalar steps per row instead
of ``k``. Ties still go to the lowest centroid id, exactly as ``argmin``. The
[rows, 1024] score block stays in cache.

Bound groups: runs of consecutive groups (at most ``MAX_BOUND_GROUPS`` per k-means)
whose minimum scores, excluding the winner, give the per-group lower bounds that
lloyd.py uses to skip rows (Yinyang k-means, Ding et al. 2015). They come almost
free from the group minima.

Determinism: each score is one dot product over d for one (row, centroid) pair;
measured bit-identical whatever the other rows of the block are.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax



# Score blocks of ~4 MB: measured fastest on a 2-core AVX-512 machine.
CENTROID_BLOCK = 1024
MAX_BOUND_GROUPS = 64


class TileSpec(NamedTuple):
  """Static layout of k centroids: ``blocks`` x ``per_block`` slots (padded)."""
  blocks: int
  per_block: int
  group: int        # ids per argmin group
  bound_group: int  # ids per bound group (a multiple of ``group``, divides per_block)

  @property
  def bound_groups(self) -> int:
    return self.blocks * self.per_block // self.bound_group


def tile_spec(k: int) -> TileSpec:
  """Blocks of <= CENTROID_BLOCK ids; groups of 16 (k <= 1024) or 32; <= 64 bound groups."""
  if k <= 16:
    return TileSpec(1, k, k, k)
  group = 16 if k <= CENTROID_BLOCK else 32
  blocks = math.ceil(k / CENTROID_BLOCK)
  per_block = -(-math.ceil(k / blocks) // group) * group
  per_bound = per_block // group
  runs = 1  # groups per bound group: a power of two dividing the groups of a block
  while blocks * per_bound // runs > MAX_BOUND_GROUPS and per_bound % (2 * runs) == 0:
    runs *= 2
  return TileSpec(blocks, per_block, group, group * runs)


class CentroidTiles(NamedTuple):
  """Centroids laid out for the scan: [blocks, block, d] plus their squared norms."""
  neg2: jax.Array      # -2 c, padded with zeros
  sq_norms: jax.Array  # ||c||^2, padded with +inf so padding never wins


def tile_centroids(centroids: jax.Array, spec: TileSpec) -> CentroidTiles:
  k, d = centroids.shape
  pad = spec.blocks * spec.per_block - k
  neg2 = jnp.pad(-2.0 * centroids, ((0, pad), (0, 0)))
  sq = jnp.pad(row_sums(centroids * centroids), (0, pad), constant_values=jnp.inf)
  return CentroidTiles(neg2.reshape(spec.blocks, spec.per_block, d),
                       sq.reshape(spec.blocks, spec.per_block))


def _scores(x: jax.Array, tiles: CentroidTiles, b) -> jax.Array:
  neg2 = lax.dynamic_index_in_dim(tiles.neg2, b, keepdims=False)
  sq = lax.dynamic_index_in_dim(tiles.sq_norms, b, keepdims=False)
  return lax.dot_general(x, neg2, (((1,), (1,)), ((), ()))) + sq[None, :]


def _block_argmin(scores: jax.Array, group: int):
  """Two-level argmin over the last axis of [rows, width].

  Returns (min, first index of min, group minima [rows, width/group], the winner's
  group, the second smallest score inside the winner's group).
  """
  rows, width = scores.shape
  grouped = scores.reshape(rows, width // group, group)
  # The barrier keeps XLA from re-running this reduction inside each consumer.
  group_min = lax.optimization_barrier(jnp.min(grouped, axis=2))
  g = jnp.argmin(group_min, axis=1).astype(jnp.int32)
  inside = jnp.take_along_axis(grouped, g[:, None, None], axis=1)[:, 0]
  offset = jnp.argmin(inside, axis=1).astype(jnp.int32)
  slot = lax.broadcasted_iota(jnp.int32, inside.shape, 1)
  second = jnp.min(jnp.where(slot == offset[:, None], jnp.inf, inside), axis=1)
  best = jnp.take_along_axis(group_min, g[:, None], axis=1)[:, 0]
  return best, g * group + offset, group_min, g, second


def nearest(x: jax.Array, tiles: CentroidTiles, spec: TileSpec,
            num_blocks=None) -> tuple[jax.Array, jax.Array]:
  """(index int32, score float32) [rows] of the nearest centroid to each row of ``x``.

  ``score`` is ``||c||^2 - 2 x.c`` of the winner. ``num_blocks`` (a traced scalar)
  restricts the search to the first blocks of ``tiles`` (a compacted subset of
  centroids); by default all blocks are searched.
  """
  if spec.blocks == 1 and num_blocks is None:
    best, index = _block_argmin(_scores(x, tiles, 0), spec.group)[:2]
    return index, best

  def body(b, carry):
    best, index = carry
    value, idx = _block_argmin(_scores(x, tiles, b), spec.group)[:2]
    better = value < best  # strict: on ties the earlier block (lower id) wins
    return jnp.where(better, value, best), jnp.where(better, idx + b * spec.per_block, index)

  init = (jnp.full((x.shape[0],), jnp.inf, jnp.float32), jnp.zeros((x.shape[0],), jnp.int32))
  best, index = lax.fori_loop(0, spec.blocks if num_blocks is None else num_blocks, body, init)
  return index, best


def nearest_with_bounds(x: jax.Array, tiles: CentroidTiles, spec: TileSpec):
  """``nearest`` over all centroids, plus each bound group's minimum score [rows, t].

  The winner's own bound group reports its *second* smallest score, so every entry
  is the best score any other centroid of that group reaches. All of it comes from
  the group minima and the winner's group, which the two-level argmin has anyway.
  """
  rows = x.shape[0]
  bounds_per_block = spec.per_block // spec.bound_group
  runs = spec.bound_group // spec.group

  def block(b):
    value, idx, group_min, g, second = _block_argmin(_scores(x, tiles, b), spec.group)
    others = jnp.where(lax.broadcasted_iota(jnp.int32, group_min.shape, 1) == g[:, None],
                       second[:, None], group_min)  # the winner itself left out
    as_loser = jnp.min(group_min.reshape(rows, bounds_per_block, runs), axis=2)
    as_winner = jnp.min(others.reshape(rows, bounds_per_block, runs), axis=2)
    return value, idx, as_loser, as_winner

  if spec.blocks == 1:
    best, index, _, mins = block(0)
    return index, best, mins

  def body(b, carry):
    best, index, mins, win_block, win_mins = carry
    value, idx, as_loser, as_winner = block(b)
    better = value < best  # strict: on ties the earlier block (lower id) wins
    mins = lax.dynamic_update_slice_in_dim(mins, as_loser, b * bounds_per_block, axis=1)
    return (jnp.where(better, value, best), jnp.where(better, idx + b * spec.per_block, index),
            mins, jnp.where(better, b, win_block), jnp.where(better[:, None], as_winner, win_mins))

  init = (jnp.full((rows,), jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32),
          jnp.zeros((rows, spec.bound_groups), jnp.float32), jnp.zeros((rows,), jnp.int32),
          jnp.zeros((rows, bounds_per_block), jnp.float32))
  best, index, mins, win_block, win_mins = lax.fori_loop(0, spec.blocks, body, init)
  # Put the winning block's "winner left out" minima in place of its plain ones.
  column = (win_block[:, None] * bounds_per_block
            + jnp.arange(bounds_per_block, dtype=jnp.int32)[None, :])
  mins = mins.at[jnp.arange(rows)[:, None], column].set(win_mins)
  return index, best, mins


def row_sums(v: jax.Array) -> jax.Array:
  """Sum over the last axis in a fixed pairwise order (halving the width each step).

  ``jnp.sum``'s order depends on how XLA tiles the reduction, which depends on the
  number of rows; elementwise adds are never reordered, so this sum is the same
  bits whatever the block shape (and the reported objective is bit-identical
  across chunk sizes and device counts).
  """
  width = 1 << max(0, (v.shape[-1] - 1).bit_length())
  v = jnp.pad(v, ((0, 0), (0, width - v.shape[-1])))
  while width > 1:
    width //= 2
    v = v[:, :width] + v[:, width:]
  return v[:, 0]


def sq_distance(x: jax.Array, centroids: jax.Array, assignment: jax.Array) -> jax.Array:
  """``||x_i - c_{a_i}||^2`` float32 [rows], computed directly (no cancellation)."""
  diff = x - jnp.take(centroids, assignment, axis=0)
  return row_sums(diff * diff)
