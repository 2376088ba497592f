"""Nearest centroid of each row of one chunk: the only O(chunk * k * d) work in k-means.

Distances use ``||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c)``: the bracket is one matrix
product plus a broadcast add, and ``||x||^2`` is the same for every centroid so the
argmin ignores it. The winner's distance is then recomputed directly as
``sum((x - c_a)^2)`` (O(chunk * d)), which is exact where the expanded form cancels
(points on top of their centroid) and is what the objective sums.

Determinism: each score is one dot product over d for one (row, centroid) pair, so
it does not depend on which other rows share the chunk; ties go to the lowest
centroid id (``argmin``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def centroid_terms(centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(-2 c, ||c||^2): computed once per Lloyd iteration, not per chunk."""
  return -2.0 * centroids, jnp.sum(centroids * centroids, axis=1)


def nearest(x: jax.Array, neg2_centroids: jax.Array, sq_norms: jax.Array) -> jax.Array:
  """Index int32 [n] of the nearest centroid of each row of ``x`` [n, d]."""
  scores = lax.dot_general(x, neg2_centroids, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST) + sq_norms[None, :]
  return jnp.argmin(scores, axis=1).astype(jnp.int32)


def sq_distance(x: jax.Array, centroids: jax.Array, assignment: jax.Array) -> jax.Array:
  """``||x_i - c_{a_i}||^2`` float32 [n], computed directly (no cancellation)."""
  diff = x - jnp.take(centroids, assignment, axis=0)
  return jnp.sum(diff * diff, axis=1)
