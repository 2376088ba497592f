"""Feature rows on disk: each process writes and streams only its own blocks.

When a cycle's features exceed ``clustering.memory_budget_gb`` per process, they are
not kept on the devices (:class:`~deeper_jax.cluster.layout.Rows`) but written, as
they are extracted, to one ``.npy`` file per device block of the same layout
(``R = ceil(N / S)`` rows per device, mesh order)::

    <dir>/process_<P>_shard_<s>.npy     rows [s*R, min((s+1)*R, N)) of device s

Process ``P`` writes the blocks of its own devices only. PCA moments and k-means
then read them back a chunk at a time (reduce/pca.py, cluster/streamed.py), so a
process holds one chunk of rows, never its N/P rows and never all N. The few rows
every process needs (a PCA sample, the initial centroids) are read from whichever
file holds them: the workdir is shared by every process (docs/scaling.md).

A file is written under a temporary name and renamed when its block is complete,
so a killed run never leaves a block that looks finished; the run that resumes
removes whatever is there and extracts again (the clustering is redone identically).
"""
from __future__ import annotations

import dataclasses
import glob
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from deeper_jax.cluster.layout import Rows, plan_rows
from deeper_jax.runtime.mesh import rows_sharding

TMP = ".partial"


def sync(name: str) -> None:
  """A barrier of every process (nothing to wait for on one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def shard_processes(mesh: Mesh) -> tuple[int, ...]:
  """The process of each device of ``mesh``, in mesh (= row block) order."""
  return tuple(int(d.process_index) for d in mesh.devices.flat)


@dataclasses.dataclass(frozen=True)
class Spilled:
  """A matrix [N, d] float32 in per-device-block files (see the module docstring).

  ``ids`` (sorted global row ids, or None for all rows) makes it a *selection*: the
  rows one super-cluster owns, numbered ``0 .. len(ids)-1`` in row order; its
  ``shape[0]`` is ``padded_rows`` (the bucketed size in-memory k-means would pad
  them to, which sets the fixed-point format), ``len()`` the real count.
  """
  directory: str
  num_rows: int
  dim: int
  mesh: Mesh
  ids: np.ndarray | None = dataclasses.field(default=None, compare=False)
  padded_rows: int | None = None

  @property
  def rows_per_shard(self) -> int:
    return plan_rows(self.num_rows, self.mesh.size, 1).rows_per_shard

  @property
  def shape(self) -> tuple[int, int]:
    return (self.padded_rows or len(self), self.dim)

  @property
  def dtype(self):
    return np.dtype(np.float32)

  def __len__(self) -> int:
    return self.num_rows if self.ids is None else len(self.ids)

  def path(self, shard: int) -> str:
    return os.path.join(self.directory,
                        f"process_{shard_processes(self.mesh)[shard]}_shard_{shard}.npy")

  def block(self, shard: int) -> range:
    """Global rows of device ``shard``'s file."""
    r = self.rows_per_shard
    return range(min(shard * r, self.num_rows), min((shard + 1) * r, self.num_rows))

  def own_shards(self) -> list[int]:
    me = jax.process_index()
    return [s for s, p in enumerate(shard_processes(self.mesh)) if p == me]

  def select(self, ids: np.ndarray, padded_rows: int) -> "Spilled":
    """The rows ``ids`` (sorted) of this (full) matrix, as a selection."""
    return dataclasses.replace(self, ids=np.asarray(ids, np.int64), padded_rows=int(padded_rows))

  def chunks(self, chunk_rows: int):
    """This process's rows, ``chunk_rows`` at a time, from disk.

    Yields ``(rows, x)``: global row ids [c] and their features [c, d] float32 (for
    a selection: only the selected rows, ``rows`` still global).
    """
    for shard in self.own_shards():
      block = self.block(shard)
      if not len(block):
        continue
      for start in range(0, len(block), chunk_rows):
        rows = np.arange(block.start + start, block.start + min(start + chunk_rows, len(block)))
        x = _read(self.path(shard), start, len(rows), self.dim)
        if self.ids is not None:
          keep = np.isin(rows, self.ids, assume_unique=True)
          if not keep.any():
            continue
          rows, x = rows[keep], x[keep]
        yield rows, x

  def position(self, rows: np.ndarray) -> np.ndarray:
    """Index of global ``rows`` in this selection (themselves for the full matrix)."""
    return rows if self.ids is None else np.searchsorted(self.ids, rows)

  def read_rows(self, positions: np.ndarray) -> np.ndarray:
    """Rows at ``positions`` of this matrix (or selection), from any process's files."""
    positions = np.asarray(positions, np.int64)
    rows = positions if self.ids is None else self.ids[positions]
    out = np.zeros((len(rows), self.dim), np.float32)
    r = self.rows_per_shard
    for shard in np.unique(rows // r) if len(rows) else ():
      mine = np.flatnonzero(rows // r == shard)
      local = rows[mine] - shard * r
      first, last = int(local.min()), int(local.max())
      if len(mine) * 4 >= last - first + 1:  # dense: one read of the span
        out[mine] = _read(self.path(int(shard)), first, last - first + 1, self.dim)[local - first]
      else:
        for i, row in zip(mine, local):
          out[i] = _read(self.path(int(shard)), int(row), 1, self.dim)[0]
    return out

  def load_rows(self, positions: np.ndarray) -> Rows:
    """Rows at ``positions`` as :class:`Rows` on the mesh (a PCA sample): each device
    reads only its own slots of the new layout."""
    positions = np.asarray(positions, np.int64)
    m, shards = len(positions), self.mesh.size
    per = plan_rows(m, shards, 1).rows_per_shard

    def block(index):
      slots = np.arange(shards * per)[index[0]]
      out = np.zeros((len(slots), self.dim), np.float32)
      valid = slots < m
      out[valid] = self.read_rows(positions[slots[valid]])
      return out

    array = jax.make_array_from_callback((shards * per, self.dim), rows_sharding(self.mesh),
                                         block)
    return Rows(array, m)

  def remove(self) -> None:
    """Deletes this process's files (then, on process 0 after all, the directory)."""
    for shard in self.own_shards():
      for path in (self.path(shard), self.path(shard) + TMP):
        if os.path.exists(path):
          os.remove(path)
    sync(f"spill remove {self.directory}")
    if jax.process_index() == 0:
      try:
        os.rmdir(self.directory)
      except OSError:
        pass


def _read(path: str, start: int, count: int, dim: int) -> np.ndarray:
  """Rows ``[start, start+count)`` of a float32 [n, dim] ``.npy`` file, by plain reads
  (no memory map: mapped pages would stay resident and count as the process's)."""
  with open(path, "rb") as f:
    np.lib.format.read_magic(f)
    np.lib.format.read_array_header_1_0(f)  # the Writer writes version 1.0 headers
    f.seek(start * dim * 4, os.SEEK_CUR)
    out = np.fromfile(f, np.float32, count * dim)
  if out.size != count * dim:
    raise ValueError(f"{path} is shorter than its header says: was its writer killed?")
  return out.reshape(count, dim)


def clear(directory: str) -> None:
  """Removes any files a killed run left in ``directory`` (process 0), then a barrier."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    for path in glob.glob(os.path.join(directory, "process_*")):
      os.remove(path)
  sync(f"spill clear {directory}")


class Writer:
  """Writes the blocks of this process's devices of a [N, d] matrix, batch by batch.

  ``write(start, batch)``: ``batch`` is a global [S*b, d] array split over the mesh
  (device ``s`` holds the rows ``s*R + start ... + b`` of the matrix, as
  :func:`~deeper_jax.extract.features.map_rows` computes them); only the shards this
  process holds are read. ``close()`` renames the finished files and returns the
  :class:`Spilled` matrix.
  """

  def __init__(self, directory: str, num_rows: int, dim: int, mesh: Mesh):
    os.makedirs(directory, exist_ok=True)
    self.matrix = Spilled(directory, num_rows, dim, mesh)
    self.files = {}  # shard -> (file descriptor, data offset, rows)
    for shard in self.matrix.own_shards():
      count, path = len(self.matrix.block(shard)), self.matrix.path(shard) + TMP
      with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (count, dim)})
        offset = f.tell()
        f.truncate(offset + count * dim * 4)
      self.files[shard] = (os.open(path, os.O_WRONLY), offset, count)

  def _put(self, shard: int, start: int, values: np.ndarray) -> None:
    """Rows ``start ...`` of ``shard``'s block, by a positioned write (no memory map)."""
    fd, offset, _ = self.files[shard]
    os.pwrite(fd, np.ascontiguousarray(values, np.float32).tobytes(),
              offset + start * self.matrix.dim * 4)

  def write(self, start: int, batch: jax.Array) -> None:
    per_device = batch.shape[0] // self.matrix.mesh.size
    for shard in batch.addressable_shards:
      first = shard.index[0].start or 0
      data = np.asarray(shard.data, np.float32)
      for s in range(first // per_device, -(-(first + data.shape[0]) // per_device)):
        if s not in self.files:
          continue
        part = data[s * per_device - first:(s + 1) * per_device - first]
        stop = min(start + len(part), self.files[s][2])
        if stop > start:
          self._put(s, start, part[:stop - start])

  def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
    """``values`` [c, d] of global ``rows``, all in this process's blocks."""
    r = self.matrix.rows_per_shard
    for shard in np.unique(rows // r):
      mine = np.flatnonzero(rows // r == shard)
      local = rows[mine] - shard * r
      runs = np.flatnonzero(np.diff(local) != 1) + 1  # contiguous runs, one write each
      for part in np.split(np.arange(len(mine)), runs):
        self._put(int(shard), int(local[part[0]]), values[mine[part]])

  def close(self) -> Spilled:
    for shard, (fd, _, _) in self.files.items():
      os.close(fd)
      os.replace(self.matrix.path(shard) + TMP, self.matrix.path(shard))
    self.files = {}
    sync(f"spill written {self.matrix.directory}")
    return self.matrix
