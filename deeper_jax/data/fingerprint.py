"""A fingerprint of a training set: which images, in which order.

A checkpoint's cluster assignments are indices into the training set, so a resume on
another set (files added to the folder, a different long-tail seed) must be caught.
Each image gets an identity string, cheap to compute for the source it comes from:

* image folder: ``relative path \\t size \\t mtime`` (stat only, no decoding: a
  collection of millions of photos is fingerprinted in seconds). Relative, so a
  folder moved or mounted elsewhere keeps its fingerprint; size and mtime, so a
  file rewritten in place does not. File names that are not valid UTF-8 are
  written with ``\\xNN`` escapes, so that the identities can be stored as text;
* tfds: ``name/split/index`` (prepared datasets are immutable);
* packed folder (ArrayRecord): ``relative path \\t bytes \\t sha1`` from its index, written
  when packed (no record is read), so a folder packed again gives the same identities;
* in-memory arrays (Fashion-MNIST, digits): a hash of the image's pixels.

Views are seen through: a ``SubsetSource`` gives its base's identities of the
images it keeps, in its order; a ``ResizedSource`` its base's (resizing changes
no image's identity, and hashing the base's pixels avoids resizing them all).

The fingerprint is the SHA-256 of the identities in order.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from deeper_jax.data.image_folder import ImageFolderSource
from deeper_jax.data.sources import ResizedSource, SubsetSource, read_all

_CHUNK = 8192


def _printable(name: str) -> str:
  """``name`` as valid text: undecodable bytes as ``\\xNN``, tabs and newlines escaped."""
  name = os.fsencode(name).decode("utf-8", "backslashreplace")
  return name.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _folder_ids(source: ImageFolderSource, indices: np.ndarray) -> list[str]:
  ids = []
  for i in indices.tolist():
    path = source.paths[i]
    try:
      stat = os.stat(path)
      meta = f"{stat.st_size}\t{stat.st_mtime_ns}"
    except OSError:
      meta = "missing"
    ids.append(f"{_printable(os.path.relpath(path, source.root))}\t{meta}")
  return ids


def _unwrap(source):
  """The innermost source behind subset / resize views, and the indices into it."""
  base, indices = source, np.arange(len(source))
  while True:
    if isinstance(base, SubsetSource):
      base, indices = base._base, base._indices[indices]  # pylint: disable=protected-access
    elif isinstance(base, ResizedSource):
      base = base._base  # pylint: disable=protected-access
    else:
      return base, indices


def item_ids(source) -> list[str]:
  """One identity string per image of ``source``, in order."""
  base, indices = _unwrap(source)
  if isinstance(base, ImageFolderSource):
    return _folder_ids(base, indices)
  if type(base).__name__ == "ArrayRecordSource":
    return ["\t".join((_printable(base.items[i][0]), *map(str, base.items[i][1:])))
            for i in indices.tolist()]
  if type(base).__name__ == "TfdsSource":
    return [f"{base.name}/{base.split}/{i}" for i in indices.tolist()]
  ids = []
  for start in range(0, len(indices), _CHUNK):
    block = read_all(base, indices[start:start + _CHUNK])
    ids.extend(hashlib.sha1(image.tobytes()).hexdigest() for image in block)
  return ids


def fingerprint(ids: list[str]) -> str:
  """SHA-256 of the identities, in order (one per line)."""
  return hashlib.sha256("\n".join(ids).encode()).hexdigest()
