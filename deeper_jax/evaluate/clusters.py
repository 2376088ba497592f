"""Evaluator ``clusters``: the final network's clusters, with and without labels.

One more clustering of the training set with the trained network (what the next
cycle would start from), saved to ``<workdir>/eval/final_clusters.npz``, and:

* always: cluster sizes (min, max, coefficient of variation, empty ones) and NMI with
  the last training cycle's clusters (stability, DeepCluster Fig. 2b) — all a run on
  unlabelled photos can measure;
* when the training set has labels (for evaluation only): NMI, ARI and purity
  against them. Images without a label (``-1``, e.g. the clutter of an uncurated set)
  are left out of these;
* ``eval.clusters_pixel_baseline``: NMI of a k-means on the raw pixels of the same
  images, at the same number of clusters — the floor a learned clustering must beat.

RotNet learns no clusters; its features are clustered with a flat k-means of
``eval.clusters_k`` clusters, so that every method gets an NMI.

NMI and ARI are scikit-learn's (arithmetic normalisation); purity — each cluster votes
for its most frequent class — is computed from scikit-learn's contingency matrix.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from sklearn import metrics

from deeper_jax import augment
from deeper_jax.cluster import kmeans as kmeans_lib
from deeper_jax.cluster import pseudo_labels
from deeper_jax.evaluate import context as context_lib
from deeper_jax.extract import features as features_lib
from deeper_jax.reduce import pca as pca_lib
from deeper_jax.runtime import mesh as mesh_lib

FILE = "final_clusters.npz"


def purity(labels_true, labels_pred) -> float:
  """Fraction of points whose class is their cluster's most frequent class."""
  table = metrics.cluster.contingency_matrix(labels_true, labels_pred)
  return float(table.max(axis=0).sum() / table.sum())


def agreement(labels_true, labels_pred) -> dict:
  """NMI, ARI and purity of a clustering against classes (unlabelled -1 left out)."""
  labels_true, labels_pred = np.asarray(labels_true), np.asarray(labels_pred)
  keep = labels_true >= 0
  a, b = labels_true[keep], labels_pred[keep]
  return {"nmi_labels": float(metrics.normalized_mutual_info_score(a, b)),
          "ari_labels": float(metrics.adjusted_rand_score(a, b)),
          "purity_labels": purity(a, b), "labelled_images": int(keep.sum())}


def _flat_clusters(ctx: context_lib.Context, k: int) -> np.ndarray:
  """A flat k-means of the final features (PCA-whitened as for training), on the devices."""
  cfg = ctx.config.clustering
  mesh = ctx.mesh or mesh_lib.make_mesh()
  feats = features_lib.extract_rows(
      ctx.model, ctx.variables, ctx.datasets.train, image_size=ctx.config.data.image_size,
      batch_size=cfg.extract_batch_size, mesh=mesh, name="clusters: features",
      decode=ctx.decode)[features_lib.FEATURES]
  whitening = pca_lib.fit_pca_whitening(feats, min(cfg.pca_dim, feats.shape[1]),
                                        sample_size=min(cfg.pca_sample_size, len(feats)),
                                        seed=ctx.config.seed)
  reduced = pca_lib.apply_pca_whitening(whitening, feats)
  return kmeans_lib.kmeans(reduced, k, num_iters=cfg.num_iters, seed=ctx.config.seed).assignments


class _CentreViews:
  """A source's centre views as float32 in [0, 1], computed on the host (as numpy)."""

  def __init__(self, source, image_size: int):
    self.source, self.image_size = source, image_size
    self.image_shape = (image_size, image_size, source.image_shape[-1])

  def __len__(self) -> int:
    return len(self.source)

  def images(self, indices: np.ndarray) -> np.ndarray:
    block = self.source.images(indices)
    return np.asarray(augment.center_crop(block, self.image_size), np.float32) / 255.0


def pixel_kmeans(source, k: int, image_size: int, seed: int, num_iters: int = 10,
                 mesh=None) -> np.ndarray:
  """k-means on the raw pixels (centre view, in [0, 1]) of every image of ``source``.

  The pixels are read like features (:func:`~deeper_jax.extract.features.map_rows`):
  each process reads its own devices' rows, which stay on the devices.
  """
  views = _CentreViews(source, image_size)
  rows = features_lib.map_rows(
      _flatten, views, np.arange(len(views)), batch_size=4096, image_dtype=np.float32,
      out_dims={"pixels": int(np.prod(views.image_shape))},
      mesh=mesh or mesh_lib.make_mesh(), name="clusters: pixels")["pixels"]
  return kmeans_lib.kmeans(rows, k, num_iters=num_iters, seed=seed).assignments


@jax.jit
def _flatten(views: jax.Array) -> dict:
  return {"pixels": views.reshape(views.shape[0], -1)}


def evaluate(ctx: context_lib.Context) -> dict:
  method, cfg = ctx.config.method, ctx.config.eval
  if pseudo_labels.needs_clustering(method):
    clusters, metrics_ = context_lib.final_clusters(ctx)
    labels = pseudo_labels.flat_labels(clusters["super_labels"], clusters["sub_labels"],
                                       method.num_sub_clusters)
    num_clusters = method.num_super_clusters * method.num_sub_clusters
    result = {k: v for k, v in metrics_.items() if k != "nmi_labels"}
    result["how"] = f"hierarchical k-means, {method.num_super_clusters} x {method.num_sub_clusters}"
  else:
    num_clusters = cfg.clusters_k
    labels = _flat_clusters(ctx, num_clusters)
    clusters = {"labels": labels}
    result = pseudo_labels.size_stats(labels, num_clusters)
    result["how"] = f"flat k-means of the final features, k = {num_clusters}"
  result["num_clusters"] = int(num_clusters)
  truth = ctx.datasets.train.labels
  if truth is not None:
    result.update(agreement(truth, labels))
    if cfg.clusters_pixel_baseline:
      pixels = pixel_kmeans(ctx.datasets.train, num_clusters, ctx.config.data.image_size,
                            ctx.config.seed, ctx.config.clustering.num_iters, ctx.mesh)
      result["pixel_kmeans_nmi_labels"] = agreement(truth, pixels)["nmi_labels"]
  if ctx.writes:
    np.savez(os.path.join(ctx.out_dir, FILE), **clusters)
  ctx.cache["final_labels"] = labels
  return result
