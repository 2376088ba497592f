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

Many processes (docs/scaling.md): features are a :class:`Rows`, a global array in
exactly this layout whose shards live on the devices of every process; each process
holds only its own shards. :func:`gather_rows` builds another such matrix from some
rows of one (a PCA sample, one super-cluster's points) by moving rows between
devices, :func:`rows_to_hosts` brings a few rows to every process, and
:func:`to_hosts` a per-row vector (labels). All three move bits, never add floats, so
results are the same on one process or many.
"""
from __future__ import annotations

import dataclasses

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from deeper_jax.runtime.mesh import DATA_AXES, make_mesh, replicated, rows_sharding

# Elements of the per-device buffer one step of `gather_rows` moves (64 MB float32).
GATHER_ELEMENTS = 1 << 24


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


@dataclasses.dataclass(frozen=True)
class Rows:
  """A feature matrix [N, d] kept on the devices of every process, split by rows.

  ``array`` is the global [S*R, d] array of :func:`plan_rows`' layout (shard ``s``
  holds rows ``[s*R, (s+1)*R)``, ``R = ceil(N / S)``); rows ``>= N`` are zeros. No
  process holds more than its own shards. k-means, PCA and the hierarchical driver
  take it wherever they take a matrix, and return one where they return rows.
  """
  array: jax.Array
  num_rows: int

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.num_rows,) + tuple(self.array.shape[1:])

  @property
  def dtype(self):
    return self.array.dtype

  @property
  def mesh(self) -> Mesh:
    return self.array.sharding.mesh

  def __len__(self) -> int:
    return self.num_rows

  def to_numpy(self) -> np.ndarray:
    """All N rows on every process (for small matrices: evaluators, tests)."""
    return to_hosts(self.array)[:self.num_rows]


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
  :class:`Rows` are already laid out: returned as they are.
  """
  extra = layout.padded_rows - layout.num_rows
  if isinstance(x, Rows):
    if x.array.shape[0] != layout.padded_rows or x.mesh.size != layout.num_shards:
      raise ValueError(f"rows laid out as {x.array.shape[0]} rows over {x.mesh.size} devices "
                       f"cannot be used as {layout.padded_rows} rows over "
                       f"{layout.num_shards}; build them on this mesh.")
    return x.array.astype(jnp.float32)
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


def as_rows(x, mesh: Mesh | None = None) -> Rows:
  """A numpy or jax matrix [N, d] as float32 :class:`Rows` on ``mesh`` (Rows: as they are)."""
  if isinstance(x, Rows):
    return x
  mesh = resolve_mesh(mesh)
  layout = plan_rows(x.shape[0], mesh.size, 1)
  return Rows(put_rows(x, mesh, layout), int(x.shape[0]))


def to_hosts(x: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (all-gathered across processes)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _exact_sum(x: jax.Array) -> jax.Array:
  """``psum`` over ``DATA_AXES`` where at most one shard is non-zero: its bits, exactly.

  Summed as int32 bit patterns: ``bits + 0`` is ``bits`` whatever the order, so even
  ``-0.0`` and the last ulp survive the trip.
  """
  if x.dtype == jnp.float32:
    bits = lax.psum(lax.bitcast_convert_type(x, jnp.int32), DATA_AXES)
    return lax.bitcast_convert_type(bits, jnp.float32)
  return lax.psum(x, DATA_AXES)


@functools.lru_cache(maxsize=32)
def _pick_fn(mesh: Mesh, rows_per_shard: int):
  def shard_fn(x, ids):
    local = ids - shard_index() * rows_per_shard
    mine = (local >= 0) & (local < rows_per_shard)
    picked = x[jnp.clip(local, 0, rows_per_shard - 1)]
    return _exact_sum(jnp.where(mine[:, None], picked, jnp.zeros_like(picked)))

  return jax.jit(jax.shard_map(shard_fn, mesh=mesh, in_specs=(P(DATA_AXES), P()),
                               out_specs=P(), check_vma=False))


def rows_to_hosts(x: Rows, ids: np.ndarray) -> np.ndarray:
  """Rows ``ids`` of ``x`` as numpy [len(ids), d] on every process (a few rows only)."""
  ids = np.asarray(ids, np.int32)
  if not ids.size:
    return np.zeros((0,) + x.shape[1:], np.dtype(x.dtype))
  per_shard = x.array.shape[0] // x.mesh.size
  out = _pick_fn(x.mesh, per_shard)(x.array, jax.device_put(ids, replicated(x.mesh)))
  return np.asarray(out)


@functools.lru_cache(maxsize=32)
def _scatter_fn(mesh: Mesh, src_rows: int, dst_rows: int, piece: int):
  """Moves one piece of every destination shard: [piece, d] rows each, from anywhere."""

  def shard_fn(out, x, offsets, start):
    # offsets [1, S, piece]: for each destination shard, the local row of ``x`` that
    # goes to each slot of its piece, or -1 where the row lives on another shard.
    offsets = offsets[0]
    picked = x[jnp.clip(offsets, 0, src_rows - 1)]
    send = jnp.where((offsets >= 0)[..., None], picked, jnp.zeros_like(picked))
    if send.dtype == jnp.float32:
      send = lax.bitcast_convert_type(send, jnp.int32)
    got = lax.psum_scatter(send, DATA_AXES, scatter_dimension=0, tiled=False)
    if out.dtype == jnp.float32:
      got = lax.bitcast_convert_type(got, jnp.float32)
    return lax.dynamic_update_slice_in_dim(out, got, start, 0)

  return jax.jit(jax.shard_map(shard_fn, mesh=mesh,
                               in_specs=(P(DATA_AXES), P(DATA_AXES), P(DATA_AXES), P()),
                               out_specs=P(DATA_AXES), check_vma=False),
                 donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _zeros_fn(mesh: Mesh, shape: tuple[int, ...], dtype):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=rows_sharding(mesh))


def zeros(mesh: Mesh, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """A zero array split by rows over ``mesh``, made on the devices (no host copy)."""
  return _zeros_fn(mesh, tuple(int(n) for n in shape), np.dtype(dtype))()


def gather_rows(x: Rows, ids: np.ndarray, num_rows: int | None = None) -> Rows:
  """``x[ids]`` as new :class:`Rows` of ``num_rows >= len(ids)`` rows (zeros after).

  The rows go from the shard that holds them to the shard of the new layout that
  needs them, a piece of every destination shard per step: each source shard fills
  the slots of the rows it holds (zeros elsewhere) and a ``psum_scatter`` of the bit
  patterns delivers each destination its piece. Every process computes the same plan
  from ``ids`` and builds the offsets of its own shards only. Memory per device: one
  piece of every shard, at most ``GATHER_ELEMENTS`` values; traffic: each device
  receives ``S`` pieces per piece it keeps (a ragged all-to-all would move 1/S of it;
  XLA:CPU has none).
  """
  ids = np.asarray(ids, np.int64)
  num_rows = len(ids) if num_rows is None else int(num_rows)
  if num_rows < len(ids) or num_rows < 1:
    raise ValueError(f"num_rows={num_rows} must be >= len(ids)={len(ids)} and >= 1.")
  mesh = x.mesh
  shards, tail = mesh.size, tuple(x.array.shape[1:])
  src_rows = x.array.shape[0] // shards
  dst_rows = plan_rows(num_rows, shards, 1).rows_per_shard
  width = max(1, int(np.prod(tail)))
  piece = max(1, min(dst_rows, GATHER_ELEMENTS // (shards * width)))
  out = zeros(mesh, (shards * dst_rows,) + tail, x.dtype)
  move = _scatter_fn(mesh, src_rows, dst_rows, piece)
  slot = np.arange(piece)
  for first in range(0, dst_rows, piece):
    start = min(first, dst_rows - piece)  # the last piece overlaps: same rows again

    def offsets(index, start=start):
      sources = range(shards)[index[0]]
      position = np.arange(shards)[:, None] * dst_rows + start + slot[None, :]  # [S, piece]
      valid = position < len(ids)
      row = ids[np.where(valid, position, 0)]
      block = [np.where(valid & (row // src_rows == s), row % src_rows, -1) for s in sources]
      return np.stack(block).astype(np.int32)

    plan = jax.make_array_from_callback((shards, shards, piece), rows_sharding(mesh), offsets)
    out = move(out, x.array, plan, jax.device_put(np.int32(start), replicated(mesh)))
  return Rows(out, num_rows)


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
