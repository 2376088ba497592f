"""The run as a sequence of phases: an optional RotNet warm-up, then clustering cycles.

The paper starts DeeperCluster from a RotNet trained on the same data ("to speed up
convergence"). Here that start is part of the run: ``method.rotnet_warmup_epochs``
epochs of RotNet (R = 4, m = 1, k_sub = 1: the rotation loss only), then
``train.num_cycles`` cycles of the configured method, each a clustering followed by
``train.epochs_per_cycle`` epochs. At the switch the backbone keeps its weights and
BatchNorm statistics; heads and both optimiser states start fresh, exactly as a second
run started from the warm-up's weights (the reference's ``--pretrained``).

The checkpoint records the phase, so a run killed during the warm-up resumes in it.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import ml_collections

WARMUP, CLUSTERING = "rotnet_warmup", "clustering"


class Phase(NamedTuple):
  name: str
  method: ml_collections.ConfigDict  # R, m, k_sub, loss, head settings of this phase
  num_cycles: int
  epochs_per_cycle: int


def num_super_classes(method) -> int:
  """S = R·m: the slices of a batch and the classes of V."""
  return method.num_rotations * method.num_super_clusters


def rotnet(method) -> ml_collections.ConfigDict:
  """RotNet as a setting of ``method``: four rotations, one cluster, no sub-loss."""
  warmup = copy.deepcopy(method)
  warmup.num_rotations, warmup.num_super_clusters, warmup.num_sub_clusters = 4, 1, 1
  warmup.loss = "hierarchical"
  warmup.targets = "clusters"
  warmup.rotnet_warmup_epochs = 0
  return warmup


def phases(config) -> list[Phase]:
  """The phases of a run, in order; the last one is the configured method."""
  out = []
  if config.method.rotnet_warmup_epochs > 0:
    out.append(Phase(WARMUP, rotnet(config.method), 1, config.method.rotnet_warmup_epochs))
  out.append(Phase(CLUSTERING, config.method, config.train.num_cycles,
                   config.train.epochs_per_cycle))
  return out
