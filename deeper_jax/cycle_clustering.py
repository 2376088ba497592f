"""Step 1–5 of a cycle: features → PCA-whitening + L2 → two-level k-means → targets.

Kept apart from the train loop so notebooks can call it on any backbone, and so the
loop reads as the paper's algorithm. Everything returned is numpy, ready to be
checkpointed: a run killed after the clustering resumes without redoing it.
"""
from __future__ import annotations

import itertools

import numpy as np
from absl import logging
from sklearn.metrics import normalized_mutual_info_score

from deeper_jax import faults
from deeper_jax.clustering import hierarchical, pca as pca_lib
from deeper_jax.evaluate import features as features_lib


def is_trivial(method_config) -> bool:
  """RotNet: one super-cluster of one sub-cluster; nothing to cluster."""
  return method_config.num_super_clusters == 1 and method_config.num_sub_clusters == 1


def cluster_seed(seed: int, cycle: int) -> int:
  return int(np.random.SeedSequence([seed, cycle, 1]).generate_state(1)[0] >> 1)


def flat_labels(clusters: dict, num_sub: int) -> np.ndarray:
  """One id per (super-cluster, sub-cluster) pair."""
  return clusters["super_labels"].astype(np.int64) * num_sub + clusters["sub_labels"]


def size_stats(labels: np.ndarray, num_clusters: int) -> dict:
  sizes = np.bincount(labels, minlength=num_clusters)
  nonempty = sizes[sizes > 0]
  return {"cluster_size_min": float(nonempty.min()), "cluster_size_max": float(nonempty.max()),
          "cluster_size_cv": float(nonempty.std() / nonempty.mean()),
          "empty_clusters": float((sizes == 0).sum())}


def cluster_backbone(model, variables, source, config, *, cycle: int, mesh,
                     previous: dict | None = None) -> tuple[dict, dict]:
  """Clusters ``source`` with the current backbone. Returns (clusters, metrics)."""
  method, cfg = config.method, config.clustering
  n = len(source)
  if is_trivial(method):
    zeros = np.zeros((n,), np.int32)
    return {"super_labels": zeros, "sub_labels": zeros}, {}

  batches, iterations = itertools.count(1), itertools.count(1)  # fault-injection counters
  feats = features_lib.extract_features(
      model, variables, source, batch_size=cfg.extract_batch_size, layers=[],
      mesh=mesh, progress=lambda done, total: faults.reached("extract", next(batches)),
      name=f"cycle {cycle} extract features")[features_lib.FEATURES]
  seed = cluster_seed(config.seed, cycle)
  whitening = pca_lib.fit_pca_whitening(
      feats, cfg.pca_dim, sample_size=min(cfg.pca_sample_size, n), seed=seed, mesh=mesh)
  reduced = pca_lib.apply_pca_whitening(whitening, feats, chunk_size=cfg.chunk_size,
                                        mesh=mesh)
  result = hierarchical.hierarchical_kmeans(
      reduced, method.num_super_clusters, method.num_sub_clusters,
      num_iters=cfg.num_iters, seed=seed, chunk_size=cfg.chunk_size, mesh=mesh,
      init=cfg.init, progress=lambda it, obj: faults.reached("kmeans", next(iterations)),
      dot=cfg.dot)
  clusters = {
      "super_labels": np.asarray(result.super_labels, np.int32),
      "sub_labels": np.asarray(result.sub_labels, np.int32),
      "pca_mean": np.asarray(whitening.mean),
      "pca_projection": np.asarray(whitening.projection),
  }
  num_sub = method.num_sub_clusters
  labels = flat_labels(clusters, num_sub)
  metrics = {"kmeans_super_objective": float(result.super_objective),
             "kmeans_sub_objective": float(result.sub_objective),
             **size_stats(labels, method.num_super_clusters * num_sub)}
  if previous is not None and "super_labels" in previous:
    metrics["nmi_previous_cycle"] = float(normalized_mutual_info_score(
        flat_labels(previous, num_sub), labels))
  if source.labels is not None:
    metrics["nmi_labels"] = float(normalized_mutual_info_score(source.labels, labels))
  logging.info("cycle %d clustering: %s", cycle,
               ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
  return clusters, metrics
