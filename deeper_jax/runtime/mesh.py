"""The device mesh, and how arrays are laid out on it.

Two axes, named after the paper's distributed training (§4.2):

* ``super``: the super-class axis. A batch is laid out ``[S, b, ...]`` where slice
  ``s`` holds images of one super-cluster under one rotation; the sub-heads
  ``W: [S, D, k_sub]`` are split along this axis, so each group of devices holds
  only the heads of its own super-classes (the paper's "communication groups").
* ``data``: plain data parallelism inside a group.

Clustering treats the mesh as one flat axis over all devices (``DATA_AXES``):
features are split by rows, per-cluster statistics are ``psum``-reduced.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SUPER = "super"
DATA = "data"
# All devices, as one axis: used for rows of features (k-means, PCA, extraction).
DATA_AXES = (SUPER, DATA)


def mesh_shape(num_super_classes: int, num_devices: int) -> tuple[int, int]:
  """(super, data) sizes: as many super-class groups as divide both counts."""
  groups = math.gcd(num_super_classes, num_devices)
  return groups, num_devices // groups


def make_mesh(num_super_classes: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``('super', 'data')`` mesh over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(num_super_classes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), (SUPER, DATA))


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over every device of the mesh; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def pad_rows(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
  """Pads the leading axis with zeros to a multiple; returns (padded, n_valid)."""
  n = x.shape[0]
  extra = (-n) % multiple
  if extra:
    x = np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])
  return x, n
