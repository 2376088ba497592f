"""The end-of-run numbers every training run writes to ``<workdir>/results.json``.

A quick, fixed protocol so that runs of different methods compare at a glance:
a linear probe on the frozen last conv block (pooled below 10k dims, the paper's
rule), the same probe on the untrained network of the same seed, and the NMI of the
final network's clusters with the true labels. The full suite (every block, kNN,
fine-tuning, pictures) is ``--mode eval``.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging
from sklearn.metrics import normalized_mutual_info_score

from deeper_jax import cycle_clustering
from deeper_jax.evaluate import features as features_lib
from deeper_jax.evaluate import linear_probe
from deeper_jax.evaluate import suite

RESULTS_FILE = "results.json"


def probe_layer(model, variables, image_shape, eval_config) -> str:
  if eval_config.get("probe_layer", ""):
    return eval_config.probe_layer
  shapes = features_lib.block_shapes(model, variables, image_shape)
  return list(shapes)[-1]


def probe_top1(model, variables, datasets, eval_config, *, layer: str, seed: int,
               mesh=None) -> float:
  """Top-1 on the test split of a linear classifier on frozen ``layer`` features."""
  cfg = suite.read_eval_config(eval_config)
  train, test = datasets.labelled_train, datasets.test
  train_idx = suite.sample_indices(len(train), cfg["probe_max_train_images"], seed)
  test_idx = suite.sample_indices(len(test), cfg["probe_max_test_images"], seed + 1)
  extract = lambda source, idx: features_lib.extract_features(
      model, variables, source, layers=[layer], indices=idx, mesh=mesh,
      name=f"probe features ({layer})")[layer]
  result = linear_probe.train_linear_probe(
      extract(train, train_idx), train.labels[train_idx],
      extract(test, test_idx), test.labels[test_idx],
      num_classes=train.num_classes, epochs=cfg["probe_epochs"],
      batch_size=cfg["probe_batch_size"], lr=cfg["probe_lr"],
      momentum=cfg["probe_momentum"], weight_decay=cfg["probe_weight_decay"], seed=seed)
  return float(result.test_top1)


def write_json(path: str, payload: dict) -> None:
  """Atomic (a reader never sees half a file); only process 0 writes."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def evaluate_run(model, variables, random_variables, datasets, config, *, workdir: str,
                 mesh, history: list, wall_start: float) -> dict:
  eval_config, seed = config.eval, config.seed
  image_shape = datasets.train.image_shape
  layer = probe_layer(model, variables, image_shape, eval_config)
  trained = probe_top1(model, variables, datasets, eval_config, layer=layer, seed=seed,
                       mesh=mesh)
  untrained = probe_top1(model, random_variables, datasets, eval_config, layer=layer,
                         seed=seed, mesh=mesh)
  # The final network's clusters (one more clustering, as a next cycle would do).
  clusters, cluster_metrics = cycle_clustering.cluster_backbone(
      model, variables, datasets.train, config, cycle=config.train.num_cycles, mesh=mesh)
  labels = datasets.train.labels
  nmi = (float(normalized_mutual_info_score(
      labels, cycle_clustering.flat_labels(clusters, config.method.num_sub_clusters)))
         if labels is not None else None)
  results = {
      "linear_probe_top1": trained,
      "random_init_linear_probe_top1": untrained,
      "probe_layer": layer,
      "nmi_labels": nmi,
      "train_images": len(datasets.train),
      "wall_seconds": time.time() - wall_start,
      "final_clusters": cluster_metrics,
      "cycles": history,
  }
  write_json(os.path.join(workdir, RESULTS_FILE), results)
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "final_clusters.npz"), **clusters)
  logging.info("results: probe %.4f (random init %.4f), NMI %s, %.0f s", trained,
               untrained, nmi, results["wall_seconds"])
  return results
