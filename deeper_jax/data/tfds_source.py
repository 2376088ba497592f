"""Random access to a *prepared* tfds dataset (array_record), without TensorFlow.

``tfds.data_source`` reads array_record shards record by record and decodes
images with PIL, so any dataset a user has prepared with
``tfds build NAME --file_format=array_record`` can feed the index-driven
sampler. This module never downloads: preparing a dataset is a deliberate,
one-off user action, and a missing dataset is a clear error instead of a
surprise multi-GB transfer. ``tensorflow_datasets`` is imported only when a
source is built, so importing ``deeper_jax.data`` stays light.

Avoid touching ``feature.dtype`` here: on tfds 4.9 it imports TensorFlow
(several seconds); ``feature.np_dtype`` does not.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from deeper_jax.data import imaging
from deeper_jax.errors import DatasetNotFoundError
from deeper_jax.data.sources import SubsetSource, as_indices

_LABEL_CHUNK = 8192


def import_tfds():
  """``tensorflow_datasets``, or an ImportError that says how to get it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading tfds datasets needs tensorflow-datasets ({e}); pip install tensorflow-datasets "
        "array_record.") from e
  return tfds


def prepared_builder(name: str, data_dir: str = ""):
  """The tfds builder of ``name`` if it is prepared under ``data_dir``, else ``None``.

  Raises ``DatasetNotFoundError`` when ``name`` is neither a registered tfds
  builder nor a dataset prepared under ``data_dir``.
  """
  tfds = import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f"config.data.tfds_name={name!r} is neither a tfds dataset nor prepared under "
        f"{data_dir or 'the default tfds data dir'}; check the name (e.g. 'fashion_mnist', "
        "'cifar10') or config.data.data_dir.") from e
  return builder if builder.is_prepared() else None


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  if image.ndim == 2:
    image = image[:, :, None]
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 4:
    image, have = image[:, :, :3], 3
  if have == channels:
    return image
  if channels == 3:  # grayscale to RGB
    return np.repeat(image, 3, axis=-1)
  return np.asarray(Image.fromarray(image).convert("L"), np.uint8)[:, :, None]


class TfdsSource:
  """One split of a prepared tfds dataset as a random-access image source.

  Args:
    name: tfds dataset name, e.g. ``'cifar10'`` (``config.data.tfds_name``).
    split: any tfds split string (``'train'``, ``'train[:10%]'``, ...).
    data_dir: tfds data dir (``''``: tfds's default, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    image_size: resize + centre crop to this square size; required when the
      dataset's images have no fixed shape.
    channels: 1 or 3; default: the dataset's own (3 when unknown).
    image_key / label_key: feature names; a missing ``label_key`` means an
      unlabelled source (``labels`` is ``None``).
  """

  def __init__(self, name: str, split: str = "train", data_dir: str = "", *,
               image_size: int | None = None, channels: int | None = None,
               image_key: str = "image", label_key: str = "label"):
    tfds = import_tfds()
    builder = prepared_builder(name, data_dir)
    if builder is None:
      where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
      raise DatasetNotFoundError(
          f"tfds dataset {name!r} is not prepared in {where}; prepare it once with "
          f"`tfds build {name} --file_format=array_record --data_dir={where}` (needs network), "
          "or set --config.data.data_dir to the tfds data dir that holds it.")
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
      raise ValueError(
          f"tfds dataset {name!r} in {builder.data_dir} is stored as {file_format}, but random "
          f"access needs array_record; rebuild it with "
          f"`tfds build {name} --file_format=array_record`.")
    features = builder.info.features
    if image_key not in features:
      raise ValueError(
          f"tfds dataset {name!r} has no feature {image_key!r} (features: {sorted(features)}); "
          "set image_key to the image feature.")
    try:
      self._records = builder.as_data_source(split=split)
    except ValueError as e:
      raise ValueError(
          f"split {split!r} is not valid for tfds dataset {name!r} "
          f"(splits: {sorted(builder.info.splits)}): {e}") from e
    feature_shape = tuple(features[image_key].shape)
    feature_channels = feature_shape[-1] if len(feature_shape) == 3 else 1
    self._channels = int(channels or feature_channels or 3)
    imaging.pil_mode(self._channels)  # validates 1 or 3
    if image_size is None:
      if len(feature_shape) < 2 or None in feature_shape[:2]:
        raise ValueError(
            f"tfds dataset {name!r} has images of varying shape {feature_shape}; set "
            "config.data.image_size to resize them to one square size.")
      height, width = feature_shape[:2]
    else:
      height = width = int(image_size)
    self._shape = (int(height), int(width), self._channels)
    self._resize = image_size is not None and tuple(feature_shape[:2]) != (height, width)
    self._name, self._split, self._image_key = name, split, image_key
    self._label_key = label_key if label_key in features else None
    self._labels: np.ndarray | None = None
    self._num_classes = None
    if self._label_key is not None:
      self._num_classes = getattr(features[self._label_key], "num_classes", None)
      # Labels are read through a second view that skips image decoding.
      self._label_records = builder.as_data_source(
          split=split, decoders={image_key: tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images(np.asarray([index]))[0]

  def images(self, indices) -> np.ndarray:
    indices = as_indices(indices, len(self))
    out = np.empty((len(indices),) + self._shape, np.uint8)
    if len(indices) == 0:
      return out
    records = self._records.__getitems__([int(i) for i in indices])
    for row, record in enumerate(records):
      image = _to_channels(np.asarray(record[self._image_key], np.uint8), self._channels)
      if image.shape[:2] != self._shape[:2]:
        if not self._resize:
          raise ValueError(
              f"tfds {self._name!r} image of shape {image.shape} differs from {self._shape}; set "
              "config.data.image_size to resize.")
        image = imaging.resize_array(image, self._shape[0])
      out[row] = image
    return out

  @property
  def labels(self) -> np.ndarray | None:
    """``int32 [N]``; read once on first use (records are scanned without image decoding)."""
    if self._label_key is None:
      return None
    if self._labels is None:
      labels = np.empty(len(self), np.int32)
      for start in range(0, len(self), _LABEL_CHUNK):
        stop = min(start + _LABEL_CHUNK, len(self))
        chunk = self._label_records.__getitems__(list(range(start, stop)))
        labels[start:start + len(chunk)] = [int(r[self._label_key]) for r in chunk]
      labels.setflags(write=False)
      self._labels = labels
      if self._num_classes is None and len(labels):
        self._num_classes = int(labels.max()) + 1
    return self._labels

  @property
  def name(self) -> str:
    """The tfds dataset name (``config.data.tfds_name``)."""
    return self._name

  @property
  def split(self) -> str:
    """The tfds split string this source reads, e.g. ``'train[:10%]'``."""
    return self._split

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self._shape

  @property
  def num_classes(self) -> int | None:
    if self._num_classes is None and self._label_key is not None:
      _ = self.labels
    return self._num_classes

  def subset(self, indices) -> SubsetSource:
    return SubsetSource(self, indices)

  def __repr__(self) -> str:
    return (f"TfdsSource({self._name!r}, split={self._split!r}, n={len(self)}, "
            f"image_shape={self._shape})")
