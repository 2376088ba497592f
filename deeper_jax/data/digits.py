"""scikit-learn's bundled handwritten digits: a tiny *real* dataset, always on disk.

1797 grayscale 8×8 images, 10 classes, shipped inside scikit-learn, so
end-to-end tests and smoke runs need no download and no Debian package.
Pixel values 0..16 are scaled to 0..255 uint8.

Size: the native 8×8 is too small for the conv nets (three 2×2 poolings leave
1×1), so ``image_size`` (default 28, the Fashion-MNIST size, so the same
``small_cnn28`` runs on both) upsamples with bilinear PIL resizing; pass 8 for
the raw images.

Split: scikit-learn ships no split, so a fixed, exactly stratified one is used:
within each class, in file order, every fifth image is test (the 5th, 10th,
...), the rest train: 355 test and 1442 train images, class proportions equal to
within one image in both. It needs no RNG, so it can never drift between runs.
"""
from __future__ import annotations

import functools

import numpy as np

from deeper_jax.data.sources import ArraySource, resized

NATIVE_SIZE = 8
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  # Imported here: scikit-learn takes ~1 s to import and only this loader needs it.
  from sklearn.datasets import load_digits as sklearn_load_digits
  bunch = sklearn_load_digits()
  images = np.round(np.asarray(bunch.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  images = images[..., None]
  labels = np.asarray(bunch.target, np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_digits(split: str = "train", image_size: int = 28) -> ArraySource:
  """The ``'train'`` (1442), ``'test'`` (355) or ``'all'`` (1797) digits, ``[N, s, s, 1]`` uint8."""
  images, labels = _digits_arrays()
  index = np.arange(len(images))
  # Rank of each image among the images of its class, in file order.
  rank_in_class = np.empty(len(labels), np.int64)
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    rank_in_class[members] = np.arange(len(members))
  is_test = rank_in_class % 5 == 4
  if split == "train":
    keep = index[~is_test]
  elif split == "test":
    keep = index[is_test]
  elif split == "all":
    keep = index
  else:
    raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}.")
  source = ArraySource(images[keep], labels[keep], NUM_CLASSES)
  if image_size == NATIVE_SIZE:
    return source
  # Resize once, eagerly: 1797 tiny images take milliseconds, and an
  # ArraySource is cheaper to read (and to pickle) than a lazy resizing view.
  view = resized(source, image_size)
  return ArraySource(view.images(np.arange(len(view))), source.labels, NUM_CLASSES)
