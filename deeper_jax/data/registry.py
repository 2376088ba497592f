"""``config.data`` → the three sources a run reads.

* ``train``: the pre-training set. Its labels, where it has any, are for
  evaluation only (NMI of clusters vs classes); training never reads them.
* ``labelled_train``: a *balanced* labelled set for the linear probes and kNN
  (paper §5: probes train on ImageNet's labelled train split even when the
  backbone was pre-trained on YFCC); ``None`` when there is none.
* ``test``: labelled test split for probe accuracy; ``None`` when there is none.

Fields read (``config.data``): ``name``, ``data_dir``, ``image_size``,
``imbalance_ratio``, ``max_train_images``; optional, via ``.get``:
``max_eval_images`` (0 = all), ``seed`` (which images the long-tail and
``max_*`` subsets keep; 0 by default, deliberately separate from the training
seed so that runs with different seeds train on the same images),
``eval_dir``, ``labels_from_subdirs``, ``channels`` (image folders),
``tfds_name``, ``train_split``, ``test_split`` (tfds), ``download`` (let tfds
download Fashion-MNIST; default False).
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

from deeper_jax.data.digits import load_digits
from deeper_jax.data.errors import DatasetNotFoundError
from deeper_jax.data.fashion_mnist import load_fashion_mnist
from deeper_jax.data.image_folder import ImageFolderSource
from deeper_jax.data.long_tail import long_tail_indices
from deeper_jax.data.sources import Source, random_subset, resized

class Datasets(NamedTuple):
  train: Source
  labelled_train: Source | None
  test: Source | None


def _image_size(data_config: Any, default: int) -> int:
  size = int(data_config.get("image_size", 0) or default)
  if size <= 0:
    raise ValueError(f"config.data.image_size must be a positive integer, got {size}.")
  return size


def _fashion_mnist(data_config: Any, long_tail: bool) -> Datasets:
  data_dir = data_config.get("data_dir", "")
  download = bool(data_config.get("download", False))
  train = load_fashion_mnist("train", data_dir, download=download)
  test = load_fashion_mnist("test", data_dir, download=download)
  labelled_train = train
  if long_tail:
    ratio = float(data_config.get("imbalance_ratio", 10.0))
    keep = long_tail_indices(train.labels, ratio, seed=int(data_config.get("seed", 0)))
    train = train.subset(keep)
  size = _image_size(data_config, 28)
  return Datasets(resized(train, size), resized(labelled_train, size), resized(test, size))


def _digits(data_config: Any) -> Datasets:
  size = _image_size(data_config, 28)
  train = load_digits("train", size)
  return Datasets(train, train, load_digits("test", size))


def _image_folder(data_config: Any) -> Datasets:
  data_dir = data_config.get("data_dir", "")
  if not data_dir:
    raise ValueError(
        "config.data.data_dir must name the image folder to pre-train on when "
        "config.data.name='image_folder'.")
  if not os.path.isdir(data_dir):
    raise DatasetNotFoundError(
        f"config.data.data_dir={data_dir!r} is not a directory; point it at the image folder.")
  size = _image_size(data_config, 224)
  channels = int(data_config.get("channels", 3))
  train = ImageFolderSource(data_dir, size, channels=channels,
                            labels_from_subdirs=bool(data_config.get("labels_from_subdirs", False)))
  eval_dir = data_config.get("eval_dir", "")
  if not eval_dir:
    return Datasets(train, None, None)
  paths = {split: os.path.join(eval_dir, split) for split in ("train", "test")}
  for split, path in paths.items():
    if not os.path.isdir(path):
      raise DatasetNotFoundError(
          f"config.data.eval_dir={eval_dir!r} has no {split!r} sub-folder; it must hold train/ and "
          "test/, each with one sub-folder of images per class.")
  labelled = ImageFolderSource(paths["train"], size, channels=channels, labels_from_subdirs=True)
  test = ImageFolderSource(paths["test"], size, channels=channels, labels_from_subdirs=True,
                           class_names=labelled.class_names)
  return Datasets(train, labelled, test)


def _tfds(data_config: Any) -> Datasets:
  from deeper_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
  name = data_config.get("tfds_name", "")
  if not name:
    raise ValueError(
        "config.data.tfds_name must name a prepared tfds dataset (e.g. 'cifar10') when "
        "config.data.name='tfds'.")
  data_dir = data_config.get("data_dir", "")
  size = int(data_config.get("image_size", 0)) or None
  channels = data_config.get("channels", None)
  train = TfdsSource(name, data_config.get("train_split", "train"), data_dir,
                     image_size=size, channels=channels)
  test_split = data_config.get("test_split", "test")
  test = None
  if test_split:
    test = TfdsSource(name, test_split, data_dir, image_size=size, channels=channels)
  labelled = train if train.labels is not None else None
  return Datasets(train, labelled, test if test is not None and test.labels is not None else None)


# config.data.name -> builder of the un-subsetted sources.
DATASETS: dict[str, Callable[[Any], Datasets]] = {
    "fashion_mnist": lambda data_config: _fashion_mnist(data_config, long_tail=False),
    "fashion_mnist_longtail": lambda data_config: _fashion_mnist(data_config, long_tail=True),
    "digits": _digits,
    "image_folder": _image_folder,
    "tfds": _tfds,
}
DATASET_NAMES = tuple(DATASETS)


def build_datasets(data_config: Any) -> Datasets:
  """The train / labelled-train / test sources described by ``config.data``."""
  name = data_config.get("name", "")
  if name not in DATASETS:
    raise ValueError(
        f"config.data.name={name!r} is not a known dataset; use one of {', '.join(DATASET_NAMES)}.")
  seed = int(data_config.get("seed", 0))
  max_train = int(data_config.get("max_train_images", 0))
  max_eval = int(data_config.get("max_eval_images", 0))
  for field, value in (("max_train_images", max_train), ("max_eval_images", max_eval)):
    if value < 0:
      raise ValueError(f"config.data.{field} must be >= 0 (0 = all images), got {value}.")
  datasets = DATASETS[name](data_config)
  train = random_subset(datasets.train, max_train, seed)
  labelled, test = datasets.labelled_train, datasets.test
  if labelled is not None:
    labelled = random_subset(labelled, max_eval, seed + 1)
  if test is not None:
    test = random_subset(test, max_eval, seed + 2)
  return Datasets(train, labelled, test)
