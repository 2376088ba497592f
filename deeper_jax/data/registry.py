"""``config.data`` → the three sources a run reads.

* ``train``: the pre-training set. Its labels, where it has any, are for
  evaluation only (NMI of clusters vs classes); training never reads them.
* ``labelled_train``: a *balanced* labelled set for the linear probes and kNN
  (paper §5: probes train on ImageNet's labelled train split even when the
  backbone was pre-trained on YFCC); ``None`` when there is none.
* ``test``: labelled test split for probe accuracy; ``None`` when there is none.

``'image_folder'`` reads a folder of image files, ``'array_record'`` the same folder
packed into ArrayRecord shards (``python -m deeper_jax.data.pack``): same images, same
order, same pixels; both take probe folders from ``data.eval_dir``.

Every source returns square ``uint8`` images of side ``data.load_size`` (0 = the
network's ``data.image_size``): the training step draws its random crops from them
and the extraction takes their centre ``image_size`` square (deeper_jax/augment.py).
``data.seed`` picks which images the long-tail and ``max_*`` subsets keep (and the
uncurated set's duplicates and clutter, and the validation split), apart from the
training seed, so that runs with different seeds train on the same images.

``data.validation_size > 0`` (Fashion-MNIST datasets only) holds out a stratified
sample of the train split as the ``test`` source (``validation.py``): it is removed
from ``labelled_train`` and from ``train``, and the real test split is not read.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import numpy as np

from deeper_jax.data import uncurated, validation
from deeper_jax.data.digits import load_digits
from deeper_jax.data.fashion_mnist import load_fashion_mnist
from deeper_jax.data.image_folder import ImageFolderSource
from deeper_jax.data.long_tail import long_tail_indices
from deeper_jax.data.sources import ArraySource, Source, random_subset, resized
from deeper_jax.errors import ConfigError, DatasetNotFoundError


class Datasets(NamedTuple):
  train: Source
  labelled_train: Source | None
  test: Source | None


def load_size(data_config: Any) -> int:
  """The side every source decodes to: ``load_size``, or ``image_size`` when 0."""
  return int(data_config.load_size or data_config.image_size)


def _fashion_mnist_splits(data_config: Any) -> tuple[ArraySource, np.ndarray, ArraySource]:
  """(labelled train split, its indices in the 60k train images, evaluation split).

  The evaluation split is the test split, or the validation images held out of
  the train split when ``validation_size > 0`` (then the test split is not read).
  """
  load = lambda split: load_fashion_mnist(split, data_config.data_dir,
                                          download=data_config.download)
  full = load("train")
  size = data_config.validation_size
  if not size:
    return full, np.arange(len(full)), load("test")
  if size > len(full) // 2:
    raise ConfigError(
        f"config.data.validation_size={size} would hold out more than half of the "
        f"{len(full)} Fashion-MNIST train images; use at most {len(full) // 2}.")
  held_out = validation.stratified_indices(full.labels, size, seed=data_config.seed)
  kept = np.setdiff1d(np.arange(len(full)), held_out)
  return full.subset(kept), kept, full.subset(held_out)


def _uncurated_fractions(data_config: Any) -> tuple[float, float]:
  duplicates, clutter = data_config.duplicate_fraction, data_config.clutter_fraction
  for field, value in (("duplicate_fraction", duplicates), ("clutter_fraction", clutter)):
    if not 0 <= value < 1:
      raise ConfigError(f"config.data.{field}={value!r} must lie in [0, 1).")
  if duplicates + clutter >= 1:
    raise ConfigError(
        f"config.data.duplicate_fraction + config.data.clutter_fraction = {duplicates} + "
        f"{clutter} must be < 1: the rest of the uncurated set are the Fashion-MNIST images.")
  return duplicates, clutter


def _fashion_mnist(data_config: Any, variant: str) -> Datasets:
  """``variant``: 'balanced' (the train split), 'longtail' or 'uncurated' (uncurated.py)."""
  if variant == "uncurated":
    duplicates, clutter = _uncurated_fractions(data_config)
  labelled_train, origin, test = _fashion_mnist_splits(data_config)
  train = labelled_train
  if variant != "balanced":
    keep = long_tail_indices(train.labels, data_config.imbalance_ratio, seed=data_config.seed)
    train, origin = train.subset(keep), origin[keep]
  if variant == "uncurated":
    train = uncurated.make_uncurated(train, duplicate_fraction=duplicates,
                                     clutter_fraction=clutter, seed=data_config.seed,
                                     origin=origin)
  size = load_size(data_config)
  return Datasets(resized(train, size), resized(labelled_train, size), resized(test, size))


def _digits(data_config: Any) -> Datasets:
  size = load_size(data_config)
  train = load_digits("train", size)
  return Datasets(train, train, load_digits("test", size))


def _channels(data_config: Any) -> int:
  return int(data_config.channels) or 3


def image_channels(data_config: Any) -> int:
  """Channels of the images ``config.data`` gives, known without reading any."""
  if data_config.name in GRAYSCALE:
    return 1
  return _channels(data_config)


def _image_folder(data_config: Any) -> Datasets:
  data_dir = data_config.data_dir
  if not data_dir:
    raise ConfigError(
        "config.data.data_dir must name the image folder to pre-train on when "
        "config.data.name='image_folder'.")
  size, channels = load_size(data_config), _channels(data_config)
  train = ImageFolderSource(data_dir, size, channels=channels,
                            labels_from_subdirs=data_config.labels_from_subdirs)
  return Datasets(train, *_eval_folders(data_config))


def _array_record(data_config: Any) -> Datasets:
  # Imported here: it imports grain, which only runs that read shards need.
  from deeper_jax.data import array_record_source  # pylint: disable=g-import-not-at-top
  if not data_config.data_dir:
    raise ConfigError(
        "config.data.data_dir must name a packed folder (python -m deeper_jax.data.pack) when "
        "config.data.name='array_record'.")
  train = array_record_source.ArrayRecordSource(
      data_config.data_dir, load_size(data_config), channels=_channels(data_config))
  return Datasets(train, *_eval_folders(data_config))


def _eval_folders(data_config: Any) -> tuple[Source | None, Source | None]:
  """The labelled train / test folders of ``data.eval_dir``, or ``(None, None)``."""
  if not data_config.eval_dir:
    return None, None
  size, channels = load_size(data_config), _channels(data_config)
  paths = {split: os.path.join(data_config.eval_dir, split) for split in ("train", "test")}
  for split, path in paths.items():
    if not os.path.isdir(path):
      raise DatasetNotFoundError(
          f"config.data.eval_dir={data_config.eval_dir!r} has no {split!r} sub-folder; it must "
          "hold train/ and test/, each with one sub-folder of images per class.")
  labelled = ImageFolderSource(paths["train"], size, channels=channels, labels_from_subdirs=True)
  test = ImageFolderSource(paths["test"], size, channels=channels, labels_from_subdirs=True,
                           class_names=labelled.class_names)
  return labelled, test


def _tfds(data_config: Any) -> Datasets:
  from deeper_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
  if not data_config.tfds_name:
    raise ConfigError(
        "config.data.tfds_name must name a prepared tfds dataset (e.g. 'cifar10') when "
        "config.data.name='tfds'.")
  kwargs = dict(image_size=load_size(data_config), channels=_channels(data_config))
  train = TfdsSource(data_config.tfds_name, data_config.train_split, data_config.data_dir,
                     **kwargs)
  test = None
  if data_config.test_split:
    test = TfdsSource(data_config.tfds_name, data_config.test_split, data_config.data_dir,
                      **kwargs)
  labelled = train if train.labels is not None else None
  return Datasets(train, labelled, test if test is not None and test.labels is not None else None)


FASHION_MNIST = ("fashion_mnist", "fashion_mnist_longtail", "fashion_mnist_uncurated")
GRAYSCALE = FASHION_MNIST + ("digits",)
# config.data.name -> builder of the un-subsetted sources.
DATASETS: dict[str, Callable[[Any], Datasets]] = {
    "fashion_mnist": lambda data_config: _fashion_mnist(data_config, "balanced"),
    "fashion_mnist_longtail": lambda data_config: _fashion_mnist(data_config, "longtail"),
    "fashion_mnist_uncurated": lambda data_config: _fashion_mnist(data_config, "uncurated"),
    "digits": _digits,
    "image_folder": _image_folder,
    "array_record": _array_record,
    "tfds": _tfds,
}


def _capped(source: Source | None, max_images: int, seed: int) -> Source | None:
  return None if source is None else random_subset(source, max_images, seed)


def build_datasets(data_config: Any) -> Datasets:
  """The train / labelled-train / test sources described by ``config.data``."""
  if data_config.name not in DATASETS:
    raise ConfigError(f"config.data.name={data_config.name!r} is not a known dataset; use one "
                      f"of {', '.join(DATASETS)}.")
  for field in ("max_train_images", "max_eval_images"):
    if data_config[field] < 0:
      raise ConfigError(f"config.data.{field}={data_config[field]} must be >= 0 (0 = all images).")
  if data_config.validation_size < 0:
    raise ConfigError(f"config.data.validation_size={data_config.validation_size} must be >= 0 "
                      "(0 = evaluate on the test split).")
  if data_config.validation_size and data_config.name not in FASHION_MNIST:
    raise ConfigError(
        f"config.data.validation_size={data_config.validation_size} is only for the "
        f"Fashion-MNIST datasets ({', '.join(FASHION_MNIST)}), not "
        f"config.data.name={data_config.name!r}; set it to 0.")
  datasets = DATASETS[data_config.name](data_config)
  seed, max_eval = data_config.seed, data_config.max_eval_images
  return Datasets(_capped(datasets.train, data_config.max_train_images, seed),
                  _capped(datasets.labelled_train, max_eval, seed + 1),
                  _capped(datasets.test, max_eval, seed + 2))
