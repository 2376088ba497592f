"""How the rows of a feature matrix are padded, split over devices and chunked.

Every clustering kernel runs inside ``jax.shard_map`` over all devices of the mesh
(``DATA_AXES``): shard ``s`` holds rows ``[s*R, (s+1)*R)`` of the padded matrix and
walks over them ``chunk`` rows at a time, so a kernel's temporaries are
``O(chunk * k)`` and no ``N x k`` matrix ever exists.

Padding: ``R`` is a multiple of ``chunk`` and ``num_shards * R >= N``; the padded
rows are zeros and every kernel masks them out by their *global* row index
(``row < N``), so the statistics never depend on how much padding there is.
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
  num_rows: int        # N, real rows
  num_shards: int      # devices in the mesh
  rows_per_shard: int  # R, a multiple of ``chunk``
  chunk: int           # rows per assignment step inside a shard

  @property
  def padded_rows(self) -> int:
    return self.num_shards * self.rows_per_shard

  @property
  def chunks_per_shard(self) -> int:
    return self.rows_per_shard // self.chunk


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def plan_rows(num_rows: int, num_shards: int, chunk_size: int) -> RowLayout:
  """Chooses the chunk (at most ``chunk_size``, at least 8 rows) and the padding."""
  per_shard = -(-num_rows // num_shards)
  chunk = max(1, min(chunk_size, _round_up(per_shard, 8)))
  return RowLayout(num_rows, num_shards, _round_up(per_shard, chunk), chunk)


def resolve_mesh(mesh: Mesh | None) -> Mesh:
  return make_mesh() if mesh is None else mesh


def put_rows(x, mesh: Mesh, layout: RowLayout) -> jax.Array:
  """Pads ``x`` [N, d] with zero rows to ``layout.padded_rows`` and shards it by rows.

  Numpy input is padded on the host and transferred once with ``rows_sharding``;
  a jax array is padded on device.
  """
  extra = layout.padded_rows - layout.num_rows
  if isinstance(x, jax.Array):
    x = jnp.pad(x.astype(jnp.float32), ((0, extra), (0, 0)))
  else:
    x = np.asarray(x, np.float32)
    if extra:
      x = np.concatenate([x, np.zeros((extra, x.shape[1]), np.float32)])
  return jax.device_put(x, rows_sharding(mesh))


def shard_index() -> jax.Array:
  """Position of this shard along the flattened ``DATA_AXES`` (inside shard_map)."""
  return lax.axis_index(DATA_AXES)


def chunk_rows(layout: RowLayout, chunk_index) -> jax.Array:
  """Global row ids of one chunk of this shard (inside shard_map), int32 [chunk]."""
  start = shard_index() * layout.rows_per_shard + chunk_index * layout.chunk
  return start + jnp.arange(layout.chunk, dtype=jnp.int32)
