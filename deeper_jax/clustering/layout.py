"""How the rows of a feature matrix are padded, split over devices and chunked.

Every clustering kernel runs inside ``jax.shard_map`` over all devices of the mesh
(``DATA_AXES``): shard ``s`` holds rows ``[s*R, (s+1)*R)`` of the padded matrix and
walks over them ``chunk`` rows at a time, so a kernel's temporaries are
``O(chunk * k)`` and no ``N x k`` matrix ever exists.

Padding: ``R = ceil(N / num_shards)``, so fewer than ``num_shards`` zero rows are
added at the very end, and every kernel masks them out by their *global* row index
(``row < N``). ``R`` need not be a multiple of ``chunk``: :func:`scan_chunks` runs
the full chunks in a ``lax.scan`` and the short tail chunk once more. Keeping the
padding tiny is what lets :func:`put_rows` hand each device a view of the input
instead of building a padded copy of the whole matrix first (peak memory 1x, not 2x).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from deeper_jax.parallel import DATA_AXES, make_mesh, rows_sharding


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """Static shape facts of one padded, sharded, chunked feature matrix."""
  num_rows: int        # rows of the input; device padding comes after them
  num_shards: int      # devices in the mesh
  rows_per_shard: int  # R, a multiple of ``chunk``
  chunk: int           # rows per assignment step inside a shard

  @property
  def padded_rows(self) -> int:
    return self.num_shards * self.rows_per_shard

  @property
  def chunks_per_shard(self) -> int:
    """Full chunks per shard (a shorter tail chunk of ``tail`` rows may follow)."""
    return self.rows_per_shard // self.chunk

  @property
  def tail(self) -> int:
    return self.rows_per_shard % self.chunk


def plan_rows(num_rows: int, num_shards: int, chunk_size: int) -> RowLayout:
  """Rows per shard ``ceil(N / shards)`` and the chunk (at most ``chunk_size``)."""
  per_shard = -(-num_rows // num_shards)
  return RowLayout(num_rows, num_shards, per_shard, max(1, min(chunk_size, per_shard)))


def resolve_mesh(mesh: Mesh | None) -> Mesh:
  return make_mesh() if mesh is None else mesh


def put_rows(x, mesh: Mesh, layout: RowLayout) -> jax.Array:
  """``x`` [N, d] as float32 [padded_rows, d], split by rows with ``rows_sharding``.

  Numpy input: each device receives its own slice (a view); only a slice that runs
  past row N is copied to append its zero rows. A jax array is padded on device.
  """
  extra = layout.padded_rows - layout.num_rows
  if isinstance(x, jax.Array):
    x = x.astype(jnp.float32)
    if extra:
      x = jnp.pad(x, ((0, extra), (0, 0)))
    return jax.device_put(x, rows_sharding(mesh))
  x = np.asarray(x, np.float32)
  n, d = x.shape

  def shard_rows(index):
    rows = index[0]
    start, stop = rows.start or 0, layout.padded_rows if rows.stop is None else rows.stop
    if stop <= n:
      return x[start:stop]
    return np.concatenate([x[start:n], np.zeros((stop - max(start, n), d), np.float32)])

  return jax.make_array_from_callback((layout.padded_rows, d), rows_sharding(mesh), shard_rows)


def shard_index() -> jax.Array:
  """Position of this shard along the flattened ``DATA_AXES`` (inside shard_map)."""
  return lax.axis_index(DATA_AXES)


def chunk_rows(layout: RowLayout, chunk_index, size: int | None = None) -> jax.Array:
  """Global row ids of one chunk of this shard (inside shard_map), int32 [size]."""
  start = shard_index() * layout.rows_per_shard + chunk_index * layout.chunk
  return start + jnp.arange(layout.chunk if size is None else size, dtype=jnp.int32)


def scan_chunks(body, carry, x: jax.Array, layout: RowLayout):
  """``lax.scan`` of ``body(carry, (chunk, chunk_index)) -> (carry, per_row)`` over a shard.

  The full chunks go through one scan; a shorter tail chunk (``layout.tail`` rows)
  is one more call of ``body`` with its own static shape. Per-row outputs come back
  concatenated in row order, [R, ...].
  """
  full, d = layout.chunks_per_shard * layout.chunk, x.shape[1]
  chunks = x[:full].reshape(layout.chunks_per_shard, layout.chunk, d)
  steps = jnp.arange(layout.chunks_per_shard, dtype=jnp.int32)
  carry, ys = lax.scan(body, carry, (chunks, steps))
  ys = jax.tree.map(lambda y: y.reshape((full,) + y.shape[2:]), ys)
  if layout.tail:
    carry, tail_ys = body(carry, (x[full:], jnp.int32(layout.chunks_per_shard)))
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail_ys)
  return carry, ys
