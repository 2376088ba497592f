"""A fingerprint of a training set: which images, in which order.

A checkpoint's cluster assignments are indices into the training set, so a resume on
another set (files added to the folder, a different long-tail seed) must be caught.
Each image gets an identity string, cheap to compute for the source it comes from:

* image folder: ``relative path \\t size \\t mtime`` (stat only, no decoding: a
  collection of millions of photos is fingerprinted in seconds);
* tfds: ``name/split/index`` (prepared datasets are immutable);
* in-memory arrays (Fashion-MNIST, digits): a hash of the image's pixels.

The fingerprint is the SHA-256 of the identities in order.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from deeper_jax.data.image_folder import ImageFolderSource
from deeper_jax.data.sources import SubsetSource, read_all

_CHUNK = 8192


def _folder_ids(source: ImageFolderSource, indices: np.ndarray) -> list[str]:
  ids = []
  for i in indices.tolist():
    path = source.paths[i]
    try:
      stat = os.stat(path)
      meta = f"{stat.st_size}\t{stat.st_mtime_ns}"
    except OSError:
      meta = "missing"
    ids.append(f"{os.path.relpath(path, source.root)}\t{meta}")
  return ids


def item_ids(source) -> list[str]:
  """One identity string per image of ``source``, in order."""
  base, indices = source, np.arange(len(source))
  if isinstance(source, SubsetSource):
    base, indices = source._base, source._indices  # pylint: disable=protected-access
  if isinstance(base, ImageFolderSource):
    return _folder_ids(base, indices)
  if type(base).__name__ == "TfdsSource":
    return [f"{base.name}/{base.split}/{i}" for i in indices.tolist()]
  ids = []
  for start in range(0, len(source), _CHUNK):
    block = read_all(source, np.arange(start, min(start + _CHUNK, len(source))))
    ids.extend(hashlib.sha1(image.tobytes()).hexdigest() for image in block)
  return ids


def fingerprint(ids: list[str]) -> str:
  return hashlib.sha256("\n".join(ids).encode()).hexdigest()
