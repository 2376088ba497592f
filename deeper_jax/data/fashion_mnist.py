"""Fashion-MNIST (28×28×1, 10 classes) from local IDX files, else tfds.

Why IDX first: the Debian package ``dataset-fashion-mnist`` puts the four
original ``.gz`` files in ``/usr/share/datasets/fashion-mnist``; reading them
with numpy needs no TensorFlow and no network and takes well under a second.
tfds's own ``fashion_mnist`` builder refuses those files (its checksums are for
byte-wise different archives), so tfds is only a fallback for users who already
have it prepared (or who ask for a download).

Search order, first hit wins:
1. IDX files (``.gz`` or plain) in ``data_dir`` when given, otherwise in
   ``DEFAULT_DIRS``;
2. a tfds ``fashion_mnist`` prepared under ``data_dir`` (or tfds's default
   ``~/tensorflow_datasets`` when ``data_dir`` is empty); with
   ``download=True`` tfds may download and prepare it there;
3. otherwise ``DatasetNotFoundError`` naming every place tried and the fix.
"""
from __future__ import annotations

import functools
import gzip
import os

import numpy as np
from absl import logging

from deeper_jax.errors import DatasetNotFoundError
from deeper_jax.data.sources import ArraySource, read_all
from deeper_jax.data.tfds_source import TfdsSource, import_tfds, prepared_builder

DEFAULT_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_SIZES = {"train": 60_000, "test": 10_000}
# IDX type byte -> numpy dtype (big-endian, as the format specifies).
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally gzip-compressed) into a numpy array.

  Layout: 2 zero bytes, a type byte, a rank byte, ``rank`` big-endian uint32
  dimensions, then the data. Every field is checked, so a truncated download
  or a wrong file fails here with the path in the message, not later as
  nonsense images.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # gzip raises these on corrupt archives
    raise ValueError(f"could not read IDX file {path}: {e}; re-install or re-download it.") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(
        f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
        "expected the original Fashion-MNIST files.")
  dtype, rank = _IDX_DTYPES[data[2]], data[3]
  header = 4 + 4 * rank
  if rank == 0 or len(data) < header:
    raise ValueError(f"{path}: IDX header truncated or rank {rank} invalid.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
        f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
        f"{len(data) - header} bytes of data; the file is truncated or corrupt.")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_file(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


@functools.lru_cache(maxsize=8)
def _read_idx_split(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Decoded (images, labels), cached per process: a run reads a split several times."""
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
    raise ValueError(
        f"{images_path}: expected uint8 images of shape [N, 28, 28], got "
        f"{images.dtype} {images.shape}.")
  if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise ValueError(
        f"{labels_path}: expected {images.shape[0]} uint8 labels to match {images_path}, "
        f"got {labels.dtype} {labels.shape}.")
  if labels.max(initial=0) >= NUM_CLASSES:
    raise ValueError(f"{labels_path}: labels must be in [0, 10), got max {labels.max()}.")
  images = images[..., None]
  labels = labels.astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def _from_idx(split: str, directory: str) -> ArraySource | None:
  images_stem, labels_stem = _FILES[split]
  images_path = _find_file(directory, images_stem)
  labels_path = _find_file(directory, labels_stem)
  if images_path is None or labels_path is None:
    return None
  images, labels = _read_idx_split(os.path.abspath(images_path), os.path.abspath(labels_path))
  return ArraySource(images, labels, NUM_CLASSES)


def _read_tfds_split(split: str, data_dir: str,
                     download: bool) -> tuple[np.ndarray, np.ndarray] | str:
  """(images, labels) from a prepared tfds ``fashion_mnist``, else why not (a string)."""
  try:
    tfds = import_tfds()
    builder = prepared_builder("fashion_mnist", data_dir)
  except ImportError as e:
    # tfds's fashion_mnist module imports `importlib_resources` without declaring it.
    return f"tfds unusable ({e}; pip install importlib_resources)"
  if builder is None:
    if not download:
      return "no prepared tfds fashion_mnist"
    builder = tfds.builder("fashion_mnist", data_dir=data_dir or None, file_format="array_record")
    logging.info("Downloading and preparing tfds fashion_mnist into %s.", builder.data_dir)
    builder.download_and_prepare()
  return _read_prepared_tfds(split, data_dir)


@functools.lru_cache(maxsize=4)
def _read_prepared_tfds(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Decoded arrays of a prepared tfds split, cached like the IDX ones."""
  tfds = import_tfds()
  builder = prepared_builder("fashion_mnist", data_dir)
  file_format = builder.info.file_format
  if file_format is not None and file_format.value == "array_record":
    source = TfdsSource("fashion_mnist", split, data_dir)
    images, labels = read_all(source), np.array(source.labels)
  else:  # prepared as tfrecord: reading it needs TensorFlow (tfds.as_numpy).
    batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = np.asarray(batch["image"], np.uint8), np.asarray(batch["label"], np.int32)
  if images.ndim == 3:
    images = images[..., None]
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_fashion_mnist(split: str, data_dir: str = "", *, download: bool = False) -> ArraySource:
  """The ``'train'`` (60k) or ``'test'`` (10k) split as ``uint8 [N, 28, 28, 1]`` + labels.

  Args:
    split: ``'train'`` or ``'test'``.
    data_dir: a directory holding the IDX files (or a tfds data dir); ``''``
      searches ``DEFAULT_DIRS`` and tfds's default data dir.
    download: let tfds download and prepare ``fashion_mnist`` when nothing
      local is found (off by default: tests and offline machines never touch
      the network).
  """
  if split not in _FILES:
    raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}.")
  if data_dir and not os.path.isdir(data_dir):
    raise DatasetNotFoundError(
        f"config.data.data_dir={data_dir!r} is not a directory; point it at the folder with the "
        "Fashion-MNIST IDX files, or leave it empty to use /usr/share/datasets/fashion-mnist.")
  idx_dirs = (data_dir,) if data_dir else DEFAULT_DIRS
  for directory in idx_dirs:
    source = _from_idx(split, directory)
    if source is not None:
      _check_split_size(source, split, directory)
      return source
  arrays = _read_tfds_split(split, data_dir, download)
  if not isinstance(arrays, str):
    return ArraySource(arrays[0], arrays[1], NUM_CLASSES)
  tfds_dir = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  raise DatasetNotFoundError(
      f"Fashion-MNIST {split!r} not found: no IDX files ({', '.join(_FILES[split])}[.gz]) in "
      f"{', '.join(idx_dirs)} and {arrays} in {tfds_dir}; fix: "
      "`apt-get install dataset-fashion-mnist`, or pass --config.data.data_dir=<folder with the "
      "IDX files>, or (with a network) --config.data.download=true.")


def _check_split_size(source: ArraySource, split: str, directory: str) -> None:
  if len(source) != _SPLIT_SIZES[split]:
    # Not fatal: a user may point data_dir at a deliberately reduced copy.
    logging.warning("Fashion-MNIST %s in %s has %d images, expected %d.",
                    split, directory, len(source), _SPLIT_SIZES[split])
