"""Random-access image sources: the one interface every dataset is read through.

The sampler picks image *indices* (uniform over sub-clusters, see
``sampler.py``), so a source must answer "give me images 17, 3, 40 000" cheaply,
not stream. Every source has:

* ``len(src)``; ``src.images(indices) -> uint8 [n, H, W, C]`` (and
  ``src[i] -> uint8 [H, W, C]`` so grain-style loaders can use it);
* ``src.labels``: ``int32 [N]`` or ``None`` (uncurated data has no labels; where
  labels exist they are for evaluation only, pre-training never reads them).
  ``UNLABELLED`` (-1) marks one image without a label in a partly labelled set
  (the clutter of 'fashion_mnist_uncurated'); it is not a class;
* ``src.image_shape`` ``(H, W, C)`` and ``src.num_classes`` (or ``None``);
* ``src.subset(indices)`` -> a source over those images, labels kept.

Images stay ``uint8`` on the host: 4× less memory and transfer than float32;
the model scales them to [0, 1] on device.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from deeper_jax.data import imaging

UNLABELLED = -1  # the label of an image that has none, in a partly labelled set


@runtime_checkable
class Source(Protocol):
  """What the training loop, the feature extractor and the probes read."""

  def __len__(self) -> int: ...

  def images(self, indices: np.ndarray) -> np.ndarray: ...

  @property
  def labels(self) -> np.ndarray | None: ...

  @property
  def image_shape(self) -> tuple[int, int, int]: ...

  @property
  def num_classes(self) -> int | None: ...

  def subset(self, indices: np.ndarray) -> "Source": ...


def as_indices(indices, length: int, what: str = "indices") -> np.ndarray:
  """Validates ``indices`` as a 1-D integer array with entries in ``[0, length)``."""
  indices = np.asarray(indices)
  if indices.ndim != 1:
    raise ValueError(f"{what} must be a 1-D array of image indices, got shape {indices.shape}.")
  if indices.size == 0:
    return indices.astype(np.int64)
  if not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {indices.dtype}.")
  low, high = int(indices.min()), int(indices.max())
  if low < 0 or high >= length:
    raise IndexError(
        f"{what} must lie in [0, {length}) for a source of {length} images, got range "
        f"[{low}, {high}].")
  return indices.astype(np.int64, copy=False)


def check_labels(labels, length: int,
                 num_classes: int | None = None) -> tuple[np.ndarray | None, int | None]:
  """Labels as read-only ``int32 [length]`` and the class count (inferred if ``None``).

  Labels are class ids ``0 .. num_classes - 1``, or ``UNLABELLED`` (-1) for an image
  without a label; ``num_classes`` counts only the real classes.
  """
  if labels is None:
    if num_classes is not None:
      raise ValueError("num_classes was given but labels is None; pass labels or drop num_classes.")
    return None, None
  labels = np.asarray(labels)
  if labels.shape != (length,):
    raise ValueError(f"labels must have shape ({length},) to match the images, got {labels.shape}.")
  if length and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
  labels = labels.astype(np.int32)
  if length and labels.min() < UNLABELLED:
    raise ValueError(f"labels must be non-negative class ids, or {UNLABELLED} for an image "
                     f"without a label; got min {labels.min()}.")
  inferred = max(int(labels.max()) + 1, 0) if length else 0
  if num_classes is None:
    num_classes = inferred
  elif num_classes < inferred:
    raise ValueError(f"num_classes={num_classes} is smaller than max(labels)+1={inferred}.")
  labels.setflags(write=False)
  return labels, int(num_classes)


class ArraySource:
  """Images held in memory as one ``uint8 [N, H, W, C]`` array."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
               num_classes: int | None = None):
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(
          f"images must be uint8 [N, H, W, C], got dtype {images.dtype}; convert with "
          "np.clip(x, 0, 255).astype(np.uint8) (scaling float images in [0, 1] by 255 first).")
    if images.ndim != 4:
      raise ValueError(
          f"images must be 4-D [N, H, W, C], got shape {images.shape}; add a trailing channel "
          "axis for grayscale (images[..., None]).")
    if images.shape[-1] not in (1, 3):
      raise ValueError(f"images must have 1 or 3 channels (NHWC), got shape {images.shape}.")
    self._images = images
    self._labels, self._num_classes = check_labels(labels, len(images), num_classes)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images(np.asarray([index]))[0]

  def images(self, indices) -> np.ndarray:
    return self._images[as_indices(indices, len(self))]

  @property
  def labels(self) -> np.ndarray | None:
    return self._labels

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self._images.shape[1:])

  @property
  def num_classes(self) -> int | None:
    return self._num_classes

  @property
  def array(self) -> np.ndarray:
    """The underlying ``[N, H, W, C]`` array (no copy)."""
    return self._images

  def subset(self, indices) -> "ArraySource":
    indices = as_indices(indices, len(self))
    labels = None if self._labels is None else self._labels[indices]
    return ArraySource(self._images[indices], labels, self._num_classes)

  def __repr__(self) -> str:
    return (f"ArraySource(n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self._num_classes})")


class SubsetSource:
  """A view on some images of another source (lazy; the base decodes them)."""

  def __init__(self, base: Source, indices):
    self._base = base
    self._indices = as_indices(indices, len(base))
    base_labels = base.labels
    self._labels = None if base_labels is None else base_labels[self._indices]

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images(np.asarray([index]))[0]

  def images(self, indices) -> np.ndarray:
    return self._base.images(self._indices[as_indices(indices, len(self))])

  @property
  def labels(self) -> np.ndarray | None:
    return self._labels

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self._base.image_shape

  @property
  def num_classes(self) -> int | None:
    return self._base.num_classes

  def subset(self, indices) -> "SubsetSource":
    return SubsetSource(self._base, self._indices[as_indices(indices, len(self))])

  def __repr__(self) -> str:
    return f"SubsetSource(n={len(self)}, base={self._base!r})"


class ResizedSource:
  """Another source seen at ``size x size`` (shorter side resize + centre crop).

  Lazy, per batch: e.g. Fashion-MNIST (28×28) fed to a 32×32 network, without
  keeping a second copy of the dataset in memory.
  """

  def __init__(self, base: Source, size: int):
    if size <= 0:
      raise ValueError(f"image_size must be a positive integer, got {size!r}.")
    self._base = base
    self._size = int(size)

  def __len__(self) -> int:
    return len(self._base)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images(np.asarray([index]))[0]

  def images(self, indices) -> np.ndarray:
    batch = self._base.images(indices)
    out = np.empty((len(batch),) + self.image_shape, np.uint8)
    for i, image in enumerate(batch):
      out[i] = imaging.resize_array(image, self._size)
    return out

  @property
  def labels(self) -> np.ndarray | None:
    return self._base.labels

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self._size, self._size, self._base.image_shape[-1])

  @property
  def num_classes(self) -> int | None:
    return self._base.num_classes

  def subset(self, indices) -> "ResizedSource":
    return ResizedSource(self._base.subset(indices), self._size)

  def __repr__(self) -> str:
    return f"ResizedSource(size={self._size}, base={self._base!r})"


def resized(source: Source, size: int) -> Source:
  """``source`` at ``size x size``; the source itself when it already is."""
  height, width, _ = source.image_shape
  if (height, width) == (size, size):
    return source
  return ResizedSource(source, size)


def random_subset(source: Source, max_images: int, seed: int) -> Source:
  """At most ``max_images`` images, a seeded uniform subset in original order.

  ``max_images == 0`` means all images (the config convention).
  """
  if max_images < 0:
    raise ValueError(f"max_images must be >= 0 (0 = all), got {max_images}.")
  if max_images == 0 or max_images >= len(source):
    return source
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(len(source), size=max_images, replace=False))
  return source.subset(keep)


def read_all(source: Source, indices: Sequence[int] | None = None,
             batch_size: int = 4096) -> np.ndarray:
  """All (or the given) images of ``source`` as one array, read in batches."""
  indices = np.arange(len(source)) if indices is None else as_indices(indices, len(source))
  out = np.empty((len(indices),) + tuple(source.image_shape), np.uint8)
  for start in range(0, len(indices), batch_size):
    out[start:start + batch_size] = source.images(indices[start:start + batch_size])
  return out
