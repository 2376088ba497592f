"""Exact, order-independent per-cluster sums (why k-means is bit-identical on 1 or 8 devices).

The problem: each shard sums its points' coordinates per cluster, then ``lax.psum``
adds the shard sums. Float addition is not associative, so 1 shard and 8 shards
(or a different chunk size) round differently; centroids differ in the last bits
and after a few Lloyd iterations a point near a boundary flips cluster.

The fix: integers add associatively. Each coordinate is quantised once to a
fixed-point integer ``v = round(x_j * scale_j)`` with a power-of-two ``scale_j``
chosen from the largest ``|x_j|`` so that ``|v| <= 2**(B-1)``. ``v`` is split into a
high word ``v >> L`` and a low word ``v & (2**L - 1)``; both are summed in int32
(scatter-add per chunk), the low word's carry is moved into the high word every
few thousand rows, and the two words are ``psum``-med as integers. Nothing overflows by
construction (see :func:`choose_format`), so the sums are *exact*: the same bits for
any number of shards, chunk size, or order of points. Only then are they turned
into float32 means.

Cost: one multiply/round/shift per coordinate and an int32 scatter-add, O(N*d) per
iteration, small next to the O(N*k*d) distance products. Precision: the only
rounding is the quantisation of each coordinate, ``2**-(B-1) * max|x_j|`` with
B = 29 for 200k rows and 8192-row chunks (4e-9 for unit-norm features): finer
than float32 accumulation over many points would be. Exactness also lets
statistics be updated incrementally without drift.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_MAX_LOW_BITS = 20   # psum of low words over up to 2**(31-20) = 2048 shards fits int32.
_MIN_TOTAL_BITS = 12


class FixedPointFormat(NamedTuple):
  """``scale`` [d] float32 (powers of two) and the low-word width ``low_bits``."""
  scale: jax.Array
  low_bits: int
  total_bits: int


def choose_format(abs_max: np.ndarray, num_rows: int, chunk: int) -> FixedPointFormat:
  """Picks L (low bits) and B (bits per quantised value) so no int32 sum can overflow.

  ``chunk`` is the most rows summed between two carries: per cluster the low word
  grows by at most ``chunk * 2**L`` on top of a normalised ``< 2**L``, and
  ``(chunk+1) * 2**L <= 2**30``. Over all ``N`` rows the high
  word holds at most ``N * (2**(B-1-L) + 1)`` (values plus carries), which must stay
  below ``2**31``.
  """
  low_bits = min(_MAX_LOW_BITS, 30 - int(chunk).bit_length())
  total_bits = min(30, low_bits + 31 - int(num_rows).bit_length())
  if total_bits < _MIN_TOTAL_BITS or low_bits < 1:
    raise ValueError(
        f"too many rows ({num_rows}) or too large a chunk ({chunk}) for exact int32 "
        "centroid sums; lower chunk_size or split the data.")
  abs_max = np.asarray(abs_max, np.float64)
  exponent = np.where(abs_max > 0, np.ceil(np.log2(np.where(abs_max > 0, abs_max, 1.0))), 0)
  # Guard the rounding of log2 at exact powers of two: keep |x| * scale <= 2**(B-1).
  exponent = np.where(abs_max > 2.0 ** exponent, exponent + 1, exponent)
  # Keep the scale a normal float32 (features of absurd magnitude lose tiny digits).
  scale = np.exp2(np.clip(total_bits - 1 - exponent, -126, 127)).astype(np.float32)
  return FixedPointFormat(jnp.asarray(scale), low_bits, total_bits)


def encode(x: jax.Array, fmt: FixedPointFormat) -> tuple[jax.Array, jax.Array]:
  """[n, d] float -> (high, low) int32 words; ``x*scale`` is exact (power of two)."""
  v = jnp.round(x * fmt.scale).astype(jnp.int32)
  return v >> fmt.low_bits, v & ((1 << fmt.low_bits) - 1)


def normalise(high: jax.Array, low: jax.Array, low_bits: int) -> tuple[jax.Array, jax.Array]:
  """Moves the carry of the low word into the high word (arithmetic shift: exact)."""
  return high + (low >> low_bits), low & ((1 << low_bits) - 1)


def decode_means(high: jax.Array, low: jax.Array, counts: jax.Array,
                 fmt: FixedPointFormat) -> jax.Array:
  """Per-cluster means [k, d] float32 from exact sums; clusters with count 0 give 0."""
  total = high.astype(jnp.float32) * float(2 ** fmt.low_bits) + low.astype(jnp.float32)
  denom = jnp.maximum(counts, 1).astype(jnp.float32)[:, None] * fmt.scale[None, :]
  return total / denom
