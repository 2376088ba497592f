"""How the rows of a feature matrix are padded, split over devices and chunked.

Every clustering kernel runs inside ``jax.shard_map`` over all devices of the mesh
(``DATA_AXES``): shard ``s`` holds rows ``[s*R, (s+1)*R)`` of the padded matrix and
walks over them ``chunk`` rows at a time, so a kernel's temporaries are
``O(chunk * k)`` and no ``N x k`` matrix ever exists.

Padding: ``R = ceil(N / num_shards)``, so fewer than ``num_shards`` zero rows are
added at the very end, and every kernel masks them out by their *global* row index
(``row < N``). ``R`` need not be a multiple of ``chunk``: the last chunk of
:func:`scan_chunks` overlaps the one before it instead. Keeping the
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

from deeper_jax.runtime.mesh import DATA_AXES, make_mesh, rows_sharding


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


def scan_chunks(body, carry, arrays, layout: RowLayout):
  """Runs ``body`` over this shard's rows ``chunk`` at a time, in one ``lax.scan``.

  ``arrays``: one [R, ...] array or a tuple of them, sliced together.
  ``body(carry, chunk, rows, fresh, step) -> (carry, per_row)`` gets the [chunk, ...]
  slice(s), their global row ids ``rows`` and ``fresh`` (False for rows an earlier
  step already covered). When ``chunk`` does not divide the shard, the last step
  takes the last ``chunk`` rows, overlapping the previous one: statistics must use
  ``fresh``; per-row outputs of the overlap are recomputed identically and simply
  written again. One body instance (no separate tail) keeps compile time down.
  Returns the carry and the per-row outputs gathered in row order, [R, ...].
  """
  per_shard, size = layout.rows_per_shard, layout.chunk
  steps = -(-per_shard // size)
  firsts = jnp.arange(steps, dtype=jnp.int32) * size
  starts = jnp.minimum(firsts, per_shard - size)
  offset = shard_index() * per_shard
  block = jnp.arange(size, dtype=jnp.int32)

  def slice_at(start):
    return jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, start, size), arrays)

  shapes = jax.eval_shape(
      lambda c, chunk: body(c, chunk, block, block >= 0, jnp.int32(0))[1], carry, slice_at(0))
  outputs = jax.tree.map(lambda s: jnp.zeros((per_shard,) + s.shape[1:], s.dtype), shapes)

  def step(state, inputs):
    carry, outputs = state
    start, first, index = inputs
    carry, per_row = body(carry, slice_at(start), offset + start + block,
                          start + block >= first, index)
    outputs = jax.tree.map(lambda o, y: lax.dynamic_update_slice_in_dim(o, y, start, 0),
                           outputs, per_row)
    return (carry, outputs), None

  (carry, outputs), _ = lax.scan(step, (carry, outputs),
                                 (starts, firsts, jnp.arange(steps, dtype=jnp.int32)))
  return carry, outputs
