"""``config.data`` → the three sources a run reads.

* ``train``: the pre-training set. Its labels, where it has any, are for
  evaluation only (NMI of clusters vs classes); training never reads them.
* ``labelled_train``: a *balanced* labelled set for the linear probes and kNN
  (paper §5: probes train on ImageNet's labelled train split even when the
  backbone was pre-trained on YFCC); ``None`` when there is none.
* ``test``: labelled test split for probe accuracy; ``None`` when there is none.

Every source returns square ``uint8`` images of side ``data.load_size`` (0 = the
network's ``data.image_size``): the training step draws its random crops from them
and the extraction takes their centre ``image_size`` square (deeper_jax/augment.py).
``data.seed`` picks which images the long-tail and ``max_*`` subsets keep, apart
from the training seed, so that runs with different seeds train on the same images.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

from deeper_jax.data.digits import load_digits
from deeper_jax.data.fashion_mnist import load_fashion_mnist
from deeper_jax.data.image_folder import ImageFolderSource
from deeper_jax.data.long_tail import long_tail_indices
from deeper_jax.data.sources import Source, random_subset, resized
from deeper_jax.errors import ConfigError, DatasetNotFoundError


class Datasets(NamedTuple):
  train: Source
  labelled_train: Source | None
  test: Source | None


def load_size(data_config: Any) -> int:
  """The side every source decodes to: ``load_size``, or ``image_size`` when 0."""
  return int(data_config.load_size or data_config.image_size)


def _fashion_mnist(data_config: Any, long_tail: bool) -> Datasets:
  train = load_fashion_mnist("train", data_config.data_dir, download=data_config.download)
  test = load_fashion_mnist("test", data_config.data_dir, download=data_config.download)
  labelled_train = train
  if long_tail:
    keep = long_tail_indices(train.labels, data_config.imbalance_ratio, seed=data_config.seed)
    train = train.subset(keep)
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
  if not data_config.eval_dir:
    return Datasets(train, None, None)
  paths = {split: os.path.join(data_config.eval_dir, split) for split in ("train", "test")}
  for split, path in paths.items():
    if not os.path.isdir(path):
      raise DatasetNotFoundError(
          f"config.data.eval_dir={data_config.eval_dir!r} has no {split!r} sub-folder; it must "
          "hold train/ and test/, each with one sub-folder of images per class.")
  labelled = ImageFolderSource(paths["train"], size, channels=channels, labels_from_subdirs=True)
  test = ImageFolderSource(paths["test"], size, channels=channels, labels_from_subdirs=True,
                           class_names=labelled.class_names)
  return Datasets(train, labelled, test)


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


GRAYSCALE = ("fashion_mnist", "fashion_mnist_longtail", "digits")
# config.data.name -> builder of the un-subsetted sources.
DATASETS: dict[str, Callable[[Any], Datasets]] = {
    "fashion_mnist": lambda data_config: _fashion_mnist(data_config, long_tail=False),
    "fashion_mnist_longtail": lambda data_config: _fashion_mnist(data_config, long_tail=True),
    "digits": _digits,
    "image_folder": _image_folder,
    "tfds": _tfds,
}


def build_datasets(data_config: Any) -> Datasets:
  """The train / labelled-train / test sources described by ``config.data``."""
  if data_config.name not in DATASETS:
    raise ConfigError(f"config.data.name={data_config.name!r} is not a known dataset; use one "
                      f"of {', '.join(DATASETS)}.")
  datasets = DATASETS[data_config.name](data_config)
  seed = data_config.seed
  train = random_subset(datasets.train, data_config.max_train_images, seed)
  labelled, test = datasets.labelled_train, datasets.test
  if labelled is not None:
    labelled = random_subset(labelled, data_config.max_eval_images, seed + 1)
  if test is not None:
    test = random_subset(test, data_config.max_eval_images, seed + 2)
  return Datasets(train, labelled, test)
