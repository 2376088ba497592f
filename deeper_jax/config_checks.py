"""Fail before any compute, with one sentence naming the field and the fix.

Every check here is cheap: it runs after the (fast) dataset index is loaded and before
any model is built, so a config that cannot work costs seconds, not a cycle.
"""
from __future__ import annotations

import os

from deeper_jax import parallel
from deeper_jax.clustering import amx_dot

VALID_LOSSES = ("hierarchical", "flat")
VALID_INITS = ("random", "kmeans++")
VALID_DOTS = amx_dot.DOTS


class ConfigError(ValueError):
  """A config field has a value the run cannot work with."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def check_static(config, num_devices: int) -> None:
  """Checks that need nothing but the config and the device count."""
  # Local imports: the registries pull in the data/model packages.
  from deeper_jax.data import registry as data_registry
  from deeper_jax import models

  _require(config.data.name in data_registry.DATASETS,
           f"config.data.name={config.data.name!r} is not a known dataset; use one of "
           f"{sorted(data_registry.DATASETS)}.")
  _require(config.model.name in models.ARCHITECTURES,
           f"config.model.name={config.model.name!r} is not a known model; use one of "
           f"{sorted(models.ARCHITECTURES)}.")
  _require(not config.data.data_dir or os.path.isdir(config.data.data_dir),
           f"config.data.data_dir={config.data.data_dir!r} does not exist; point it at the "
           "folder holding the images (or '' for the default location).")
  method = config.method
  _require(method.num_rotations in (1, 4),
           f"config.method.num_rotations={method.num_rotations} must be 1 (no rotation "
           "task) or 4 (0/90/180/270°).")
  _require(method.num_super_clusters >= 1 and method.num_sub_clusters >= 1,
           "config.method.num_super_clusters and num_sub_clusters must be ≥ 1 "
           f"(got {method.num_super_clusters} and {method.num_sub_clusters}).")
  _require(method.loss in VALID_LOSSES,
           f"config.method.loss={method.loss!r} is unknown; use one of {VALID_LOSSES}.")
  _require(config.clustering.init in VALID_INITS,
           f"config.clustering.init={config.clustering.init!r} is unknown; use one of "
           f"{VALID_INITS}.")
  _require(config.clustering.dot in VALID_DOTS,
           f"config.clustering.dot={config.clustering.dot!r} is unknown; use one of "
           f"{VALID_DOTS}.")
  _require(0 < config.clustering.pca_dim <= config.model.feature_dim,
           f"config.clustering.pca_dim={config.clustering.pca_dim} must be in "
           f"[1, config.model.feature_dim={config.model.feature_dim}].")
  num_super = method.num_rotations * method.num_super_clusters
  batch = config.train.batch_size
  _require(batch % num_super == 0,
           f"config.train.batch_size={batch} does not split over the {num_super} "
           f"super-classes (rotations × super-clusters); use a multiple of {num_super}, "
           f"e.g. {num_super * max(1, round(batch / num_super))}.")
  _, data_axis = parallel.mesh_shape(num_super, num_devices)
  per_super = batch // num_super
  _require(per_super % data_axis == 0,
           f"config.train.batch_size={batch} gives {per_super} images per super-class, "
           f"which does not split over the {data_axis} devices of the data axis; use a "
           f"multiple of {num_super * data_axis}.")
  _require(config.train.num_cycles >= 1 and config.train.epochs_per_cycle >= 1,
           "config.train.num_cycles and epochs_per_cycle must be ≥ 1.")


def check_against_data(config, num_train_images: int) -> None:
  """Checks that need the size of the training set (known before any compute)."""
  method = config.method
  total = method.num_super_clusters * method.num_sub_clusters
  _require(num_train_images >= total,
           f"config.method asks for {method.num_super_clusters}×{method.num_sub_clusters}"
           f"={total} clusters but the training set has only {num_train_images} images; "
           "lower config.method.num_sub_clusters (or num_super_clusters) or use more data.")
