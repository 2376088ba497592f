"""Steps 1–5 of a cycle: extract → reduce → cluster → the pseudo-labels the heads learn.

Kept apart from the train loop so notebooks can call it on any backbone, and so the
loop reads as the paper's algorithm. Everything returned is numpy, ready to be
checkpointed: a run killed after the clustering resumes without redoing it.

The features never leave the devices: each process extracts the rows of its own
devices (:func:`~deeper_jax.extract.features.extract_rows`), PCA and k-means run on
them in place, and only the labels ([N] int32) come back, to every process.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from sklearn.metrics import normalized_mutual_info_score

from deeper_jax.cluster import hierarchical
from deeper_jax.data import pipeline
from deeper_jax.extract import features as features_lib
from deeper_jax.reduce import pca as pca_lib


def needs_clustering(method_config) -> bool:
  """False for RotNet (one super-cluster of one sub-cluster) and for training on labels."""
  return (method_config.targets == "clusters"
          and method_config.num_super_clusters * method_config.num_sub_clusters > 1)


def cluster_seed(seed: int, cycle: int) -> int:
  return int(np.random.SeedSequence([seed, cycle, 1]).generate_state(1)[0] >> 1)


def flat_labels(super_labels: np.ndarray, sub_labels: np.ndarray, num_sub: int) -> np.ndarray:
  """One id per (super-cluster, sub-cluster) pair: ``super * k_sub + sub``."""
  return np.asarray(super_labels, np.int64) * num_sub + np.asarray(sub_labels, np.int64)


def size_stats(labels: np.ndarray, num_clusters: int) -> dict:
  sizes = np.bincount(labels, minlength=num_clusters)
  nonempty = sizes[sizes > 0]
  return {"cluster_size_min": float(nonempty.min()), "cluster_size_max": float(nonempty.max()),
          "cluster_size_cv": float(nonempty.std() / nonempty.mean()),
          "empty_clusters": float((sizes == 0).sum())}


def spills(model, variables, source, config, mesh) -> bool:
  """Whether this process's share of the features, ``N·D·4 / P`` bytes, is over
  ``clustering.memory_budget_gb`` (0: no budget, the features stay on the devices)."""
  budget = config.clustering.memory_budget_gb
  if not budget:
    return False
  image_size = config.data.image_size or source.image_shape[0]
  dim, _, _ = features_lib.layer_shapes(model, variables, image_size, source.image_shape[-1])
  return len(source) * dim * 4 / jax.process_count() > budget * 1e9


def spill_dir(workdir: str, cycle: int) -> str:
  """Where a cycle's spilled features go: ``<workdir>/features/cycle_<C>``."""
  return os.path.join(workdir, "features", f"cycle_{cycle}")


def cluster_backbone(model, variables, source, config, *, cycle: int, mesh,
                     previous: dict | None = None, workdir: str | None = None
                     ) -> tuple[dict, dict]:
  """Clusters ``source`` with the current backbone. Returns (clusters, metrics).

  ``clusters``: ``super_labels`` and ``sub_labels`` ``[N]`` (sub ids local to the
  super-cluster) plus the PCA that produced them. ``metrics``: k-means objectives,
  cluster sizes, NMI with the previous cycle's clusters (stability) and, when the
  source has labels (for evaluation only), NMI with them.

  Over ``clustering.memory_budget_gb`` the features are spilled to
  ``<workdir>/features/cycle_<C>`` (cluster/spill.py): extraction writes each
  process's rows there, PCA and k-means stream them, and the files are removed once
  the labels are known: the same clusters as in memory (tests/test_spill.py).
  """
  method, cfg = config.method, config.clustering
  n = len(source)
  if not needs_clustering(method):
    zeros = np.zeros((n,), np.int32)
    if method.targets == "labels":  # the supervised bound: classes as the one sub-level
      return {"super_labels": zeros, "sub_labels": np.asarray(source.labels, np.int32)}, {}
    return {"super_labels": zeros, "sub_labels": zeros}, {}

  name = f"cycle {cycle}: extract features"
  to_disk = spills(model, variables, source, config, mesh)
  if to_disk:
    if workdir is None:
      raise ValueError("clustering.memory_budget_gb is exceeded but no workdir was given "
                       "to spill the features to.")
    directory = spill_dir(workdir, cycle)
    logging.info("%s: over the memory budget, spilled to %s", name, directory)
    feats = features_lib.spill_features(
        model, variables, source, os.path.join(directory, "raw"),
        image_size=config.data.image_size, batch_size=cfg.extract_batch_size, mesh=mesh,
        name=name, decode=pipeline.Decode.from_config(config))
  else:
    feats = features_lib.extract_rows(
        model, variables, source, image_size=config.data.image_size,
        batch_size=cfg.extract_batch_size, mesh=mesh, name=name,
        decode=pipeline.Decode.from_config(config))[features_lib.FEATURES]
  seed = cluster_seed(config.seed, cycle)
  whitening = pca_lib.fit_pca_whitening(
      feats, cfg.pca_dim, sample_size=min(cfg.pca_sample_size, n), seed=seed, mesh=mesh)
  reduced = pca_lib.apply_pca_whitening(
      whitening, feats, chunk_size=cfg.chunk_size, mesh=mesh,
      out_dir=os.path.join(directory, "reduced") if to_disk else None)
  if to_disk:
    feats.remove()
  result = hierarchical.hierarchical_kmeans(
      reduced, method.num_super_clusters, method.num_sub_clusters,
      num_iters=cfg.num_iters, seed=seed, chunk_size=cfg.chunk_size, mesh=mesh,
      init=cfg.init)
  if to_disk:
    reduced.remove()
    if jax.process_index() == 0:
      for path in (directory, os.path.dirname(directory)):
        try:
          os.rmdir(path)
        except OSError:
          pass
  clusters = {
      "super_labels": np.asarray(result.super_labels, np.int32),
      "sub_labels": np.asarray(result.sub_labels, np.int32),
      "pca_mean": np.asarray(whitening.mean),
      "pca_projection": np.asarray(whitening.projection),
  }
  num_sub = method.num_sub_clusters
  labels = flat_labels(clusters["super_labels"], clusters["sub_labels"], num_sub)
  metrics = {"kmeans_super_objective": float(result.super_objective),
             "kmeans_sub_objective": float(result.sub_objective),
             **size_stats(labels, method.num_super_clusters * num_sub)}
  if previous and "super_labels" in previous:
    metrics["nmi_previous_cycle"] = float(normalized_mutual_info_score(
        flat_labels(previous["super_labels"], previous["sub_labels"], num_sub), labels))
  if source.labels is not None:
    labelled = np.asarray(source.labels) >= 0  # -1: an unlabelled image, not a class
    metrics["nmi_labels"] = float(normalized_mutual_info_score(source.labels[labelled],
                                                               labels[labelled]))
  logging.info("cycle %d clustering: %s", cycle,
               ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
  return clusters, metrics
