"""``--mode export`` and ``--mode eval``: work on a finished (or running) workdir."""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from deeper_jax import models
from deeper_jax import pretrained
from deeper_jax import state as state_lib

EXPORT_DIR = "export"


def trained_backbone(config, workdir: str, datasets=None):
  """``(module, variables)`` from a training workdir's newest checkpoint or an export."""
  if os.path.exists(os.path.join(workdir, pretrained.MODEL_FILE)):
    return pretrained.load_pretrained(workdir)
  from deeper_jax.data import registry
  model = models.build_backbone(config.model)
  datasets = datasets or registry.build_datasets(config.data)
  image_shape = datasets.train.image_shape
  like = state_lib.init_variables(model, config, image_shape)
  return model, pretrained.load_backbone_variables(workdir, like)


def export_workdir(config, workdir: str) -> str:
  model, variables = trained_backbone(config, workdir)
  path = pretrained.export(config.model, variables, os.path.join(workdir, EXPORT_DIR))
  logging.info("exported the backbone (Sobel folded) to %s", path)
  return path


def evaluate_workdir(config, workdir: str) -> dict:
  """The full evaluation suite (``<workdir>/eval/results.json``)."""
  from deeper_jax.data import registry
  from deeper_jax.evaluate import suite
  datasets = registry.build_datasets(config.data)
  model, variables = trained_backbone(config, workdir, datasets)
  clusters_path = os.path.join(workdir, "final_clusters.npz")
  cluster_labels = None
  if os.path.exists(clusters_path):
    clusters = np.load(clusters_path)
    cluster_labels = (clusters["super_labels"].astype(np.int64)
                      * config.method.num_sub_clusters + clusters["sub_labels"])
  return suite.run_evaluation(model, variables, datasets, config.eval, workdir=workdir,
                              cluster_labels=cluster_labels, seed=config.seed)
