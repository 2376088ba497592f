"""What every evaluator reads: the trained network, the data, the config, the run.

One ``Context`` is built at the end of training (or by ``--mode eval`` from a
workdir) and handed to each evaluator named in ``config.eval.evaluators``. Work
that several evaluators need (the final clustering, the untrained network of the
same seed) is computed once, on first use.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from deeper_jax.data import pipeline
from deeper_jax.data.registry import Datasets

NEEDS_LABELS = ("needs labelled images: set config.data.eval_dir to a folder with train/ and "
                "test/, each holding one sub-folder of images per class")


@dataclasses.dataclass
class Context:
  model: Any
  variables: dict              # {'params', 'batch_stats'} of the trained backbone
  config: Any
  datasets: Datasets
  mesh: Mesh | None
  workdir: str
  last_clusters: dict | None = None  # the last training cycle's clustering, if any
  cache: dict = dataclasses.field(default_factory=dict)

  @property
  def out_dir(self) -> str:
    """``<workdir>/eval``: pictures and the final clusters."""
    path = os.path.join(self.workdir, "eval")
    os.makedirs(path, exist_ok=True)
    return path

  @property
  def writes(self) -> bool:
    """Only process 0 writes files."""
    return jax.process_index() == 0

  @property
  def decode(self) -> pipeline.Decode:
    """How evaluators decode images: as training does (``config.data.workers``)."""
    return pipeline.Decode.from_config(self.config)

  @property
  def channels(self) -> int:
    return int(self.datasets.train.image_shape[-1])

  def labelled(self) -> bool:
    """Whether the labelled train and test splits exist (probes, kNN, fine-tuning)."""
    return all(s is not None and s.labels is not None
               for s in (self.datasets.labelled_train, self.datasets.test))


def sample_indices(n: int, max_images: int, seed: int) -> np.ndarray:
  """All of ``range(n)``, or a sorted seeded random subset of ``max_images``."""
  if max_images <= 0 or max_images >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))


def num_classes(ctx: Context) -> int:
  train, test = ctx.datasets.labelled_train, ctx.datasets.test
  return int(max(train.num_classes or 0, test.num_classes or 0,
                 int(np.max(train.labels)) + 1, int(np.max(test.labels)) + 1))


def random_init_variables(ctx: Context) -> dict:
  """The untrained network of the same seed: the baseline every probe is read against."""
  if "random_init" not in ctx.cache:
    from deeper_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    ctx.cache["random_init"] = state_lib.init_variables(ctx.model, ctx.config, ctx.channels)
  return ctx.cache["random_init"]


def final_clusters(ctx: Context) -> tuple[dict, dict]:
  """The final network's clustering of the training set (one more cycle's clustering)."""
  if "final_clusters" not in ctx.cache:
    from deeper_jax.cluster import pseudo_labels  # pylint: disable=g-import-not-at-top
    ctx.cache["final_clusters"] = pseudo_labels.cluster_backbone(
        ctx.model, ctx.variables, ctx.datasets.train, ctx.config,
        cycle=ctx.config.train.num_cycles, mesh=ctx.mesh, previous=ctx.last_clusters,
        workdir=ctx.workdir)
  return ctx.cache["final_clusters"]
