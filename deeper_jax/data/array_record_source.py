"""Random access to an image folder packed into ArrayRecord shards (``data.pack``).

Why shards: a folder of millions of small photos costs one file open (and on network
storage, one round trip) per image read; a few thousand shards read by record index
do not. A record holds the image file's bytes exactly as they were on disk (verified
to decode when packed) and its path relative to the packed folder, so this source
decodes them as ``ImageFolderSource`` decodes the files: same pixels, same order
(the folder order), same fixed size (shorter side to ``image_size``, centre crop).

The packed folder (``config.data.data_dir`` with ``data.name='array_record'``) holds:

* ``images-NNNNN-of-MMMMM.array_record``: the records, in folder order;
* ``index.jsonl``: one ``[relative path, bytes, sha1]`` per record, in order (the
  fingerprint of the training set reads it: no record is read to resume a run);
* ``pack.json``: what was packed from where, and the files skipped.

No labels: the packer is for pre-training sets (probes read their own folders).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from deeper_jax.data import imaging
from deeper_jax.data.sources import SubsetSource, as_indices
from deeper_jax.errors import DatasetNotFoundError

MAGIC = b"DJIMG1"  # a record: MAGIC, uint32 LE path length, path (fs bytes), file bytes
MANIFEST = "pack.json"
INDEX = "index.jsonl"


def encode_record(relative_path: str, data: bytes) -> bytes:
  """One record: the file's relative path and its bytes."""
  path = os.fsencode(relative_path)
  return MAGIC + struct.pack("<I", len(path)) + path + data


def decode_record(record: bytes) -> tuple[str, bytes]:
  """``(relative path, file bytes)`` of a record written by ``encode_record``."""
  if record[:len(MAGIC)] != MAGIC:
    raise ValueError(f"not a deeper_jax image record (starts {record[:8]!r}); pack the "
                     "folder with `python -m deeper_jax.data.pack`.")
  start = len(MAGIC) + 4
  (length,) = struct.unpack("<I", record[len(MAGIC):start])
  return os.fsdecode(record[start:start + length]), record[start + length:]


def read_manifest(data_dir: str) -> dict:
  """The packed folder's ``pack.json``, or a one-line error saying how to make one."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.isfile(path):
    raise DatasetNotFoundError(
        f"{data_dir!r} holds no {MANIFEST}: it is not a packed image folder; make one with "
        f"`python -m deeper_jax.data.pack --src <image folder> --dst {data_dir}`.")
  with open(path) as f:
    return json.load(f)


class ArrayRecordSource:
  """The images of a packed folder, decoded to ``[image_size, image_size, channels]``.

  Args:
    data_dir: the folder ``python -m deeper_jax.data.pack`` wrote.
    image_size: side of the square images returned.
    channels: 3 (RGB) or 1 (grayscale).
    num_threads: decode threads per ``images()`` call (PIL releases the GIL).
  """

  decodes_files = True  # the input pipeline's 'auto' decodes it in worker processes

  def __init__(self, data_dir: str, image_size: int, *, channels: int = 3,
               num_threads: int = 4):
    import grain  # pylint: disable=g-import-not-at-top  # only runs that read shards need it
    manifest = read_manifest(data_dir)
    if image_size <= 0:
      raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    imaging.pil_mode(channels)  # validates 1 or 3
    shards = [os.path.join(data_dir, name) for name in manifest["shards"]]
    missing = [path for path in shards if not os.path.isfile(path)]
    if missing:
      raise DatasetNotFoundError(f"packed folder {data_dir!r} lacks {len(missing)} of its "
                                 f"{len(shards)} shards (first: {missing[0]}); pack it again.")
    with open(os.path.join(data_dir, INDEX)) as f:
      self.items: tuple[tuple[str, int, str], ...] = tuple(
          tuple(json.loads(line)) for line in f if line.strip())
    self._records = grain.sources.ArrayRecordDataSource(shards) if shards else []
    if not len(self._records) == len(self.items) == manifest["records"] > 0:
      raise DatasetNotFoundError(
          f"packed folder {data_dir!r} is inconsistent or empty: {manifest['records']} records "
          f"in {MANIFEST}, {len(self.items)} in {INDEX}, {len(self._records)} in the shards; "
          "pack it again.")
    self.root, self.skipped = data_dir, [tuple(s) for s in manifest["skipped"]]
    self._size, self._channels = int(image_size), channels
    self._threads = imaging.DecodeThreads(num_threads)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images(np.asarray([index]))[0]

  def images(self, indices) -> np.ndarray:
    indices = as_indices(indices, len(self))
    out = np.empty((len(indices),) + self.image_shape, np.uint8)
    if not len(indices):
      return out
    records = self._records.__getitems__(indices.tolist())
    for row, image in enumerate(self._threads.map(self._decode, records)):
      out[row] = image
    return out

  def _decode(self, record: bytes) -> np.ndarray:
    path, data = decode_record(record)
    try:
      return imaging.decode_bytes(data, self._size, self._channels)
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
      raise ValueError(f"record {path!r} of {self.root} no longer decodes ({type(e).__name__}: "
                       f"{e}) though it did when packed; pack the folder again.") from e

  @property
  def labels(self) -> None:
    return None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self._size, self._size, self._channels)

  @property
  def num_classes(self) -> None:
    return None

  def subset(self, indices) -> SubsetSource:
    return SubsetSource(self, indices)

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.root!r}, n={len(self)}, image_shape={self.image_shape})"
