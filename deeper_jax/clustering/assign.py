"""Nearest centroid of each row of a block: the only O(rows * k * d) work in k-means.

Scores: ``||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c)``. The bracket is one matrix
product plus a broadcast add; ``||x||^2`` is the same for every centroid, so the
argmin ignores it. The winner's distance is recomputed directly as
``sum((x - c_a)^2)`` (O(rows * d)), exact where the expanded form cancels.

Speed (measured, see benchmarks/README.md "k-means"): XLA:CPU fuses
``dot + add + min`` into one fast kernel, but ``argmin`` is a variadic
(value, index) reduction that it runs as scalar code, costing as much again as the
product. So the argmin is two-level: centroids are padded to ``groups * G``
(padding scores +inf), the cheap vectorised ``min`` over each group of ``G``
gives group minima, ``argmin`` runs only over the few groups and then over the
``G`` scores of the winning group: ``groups + G`` scalar steps per row instead of
``k``. Ties still go to the lowest centroid id, exactly as ``argmin``. Blocks of
rows and of centroids are kept small enough for the [rows, centroids] score block
to stay in cache.

Determinism: each score is one dot product over d for one (row, centroid) pair;
measured bit-identical whatever the other rows of the block are.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Score blocks of ~1-2 MB: measured fastest on a 2-core AVX-512 machine.
CENTROID_BLOCK = 1024
GROUP = 32


class CentroidTiles(NamedTuple):
  """Centroids laid out for the scan: [blocks, block, d] plus their squared norms."""
  neg2: jax.Array      # -2 c, padded with zeros
  sq_norms: jax.Array  # ||c||^2, padded with +inf so padding never wins


def tile_shape(k: int) -> tuple[int, int]:
  """(number of centroid blocks, centroids per block), the block a multiple of GROUP.

  Fewer than GROUP centroids make one block of exactly ``k`` (one group, no padding).
  """
  if k <= GROUP:
    return 1, k
  blocks = max(1, math.ceil(k / CENTROID_BLOCK))
  per_block = -(-math.ceil(k / blocks) // GROUP) * GROUP
  return blocks, per_block


def tile_centroids(centroids: jax.Array) -> CentroidTiles:
  k, d = centroids.shape
  blocks, per_block = tile_shape(k)
  pad = blocks * per_block - k
  neg2 = jnp.pad(-2.0 * centroids, ((0, pad), (0, 0)))
  sq = jnp.pad(jnp.sum(centroids * centroids, axis=1), (0, pad), constant_values=jnp.inf)
  return CentroidTiles(neg2.reshape(blocks, per_block, d), sq.reshape(blocks, per_block))


def _block_argmin(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(min, first index of min) over the last axis of [rows, G*groups], two-level."""
  rows, width = scores.shape
  group_size = GROUP if width % GROUP == 0 else width
  grouped = scores.reshape(rows, width // group_size, group_size)
  group_min = jnp.min(grouped, axis=2)
  group = jnp.argmin(group_min, axis=1).astype(jnp.int32)
  inside = jnp.take_along_axis(grouped, group[:, None, None], axis=1)[:, 0]
  offset = jnp.argmin(inside, axis=1).astype(jnp.int32)
  return (jnp.take_along_axis(group_min, group[:, None], axis=1)[:, 0],
          group * group_size + offset)


def nearest(x: jax.Array, tiles: CentroidTiles) -> jax.Array:
  """Index int32 [rows] of the nearest centroid to each row of ``x`` [rows, d]."""
  blocks, per_block, _ = tiles.neg2.shape

  def scores_of(b):
    dots = lax.dot_general(x, lax.dynamic_index_in_dim(tiles.neg2, b, keepdims=False),
                           (((1,), (1,)), ((), ())))
    return dots + lax.dynamic_index_in_dim(tiles.sq_norms, b, keepdims=False)[None, :]

  if blocks == 1:
    return _block_argmin(scores_of(0))[1]

  def body(carry, b):
    best, index = carry
    value, idx = _block_argmin(scores_of(b))
    better = value < best  # strict: on ties the earlier block (lower id) wins
    return (jnp.where(better, value, best), jnp.where(better, idx + b * per_block, index)), None

  init = (jnp.full((x.shape[0],), jnp.inf, jnp.float32), jnp.zeros((x.shape[0],), jnp.int32))
  (_, index), _ = lax.scan(body, init, jnp.arange(blocks))
  return index


def _row_sums(v: jax.Array) -> jax.Array:
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
  return _row_sums(diff * diff)
