"""Agreement between a clustering and class labels (or another clustering).

NMI and ARI are scikit-learn's (the numbers other papers report, computed the
same way). Purity, which scikit-learn lacks, is computed here from the
contingency matrix: each cluster votes for its most frequent class, purity is
the fraction of points in their cluster's majority class. NMI between the
assignments of two consecutive cycles measures clustering stability
(DeepCluster Fig. 2b): ``nmi(previous, current)``.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics


def _pair(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(labels_true).reshape(-1)
  b = np.asarray(labels_pred).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"labels_true and labels_pred must have the same length; "
                     f"got {a.shape[0]} and {b.shape[0]}.")
  if a.size == 0:
    raise ValueError("labels are empty; pass at least one labelled point.")
  return a, b


def contingency_matrix(labels_true, labels_pred) -> np.ndarray:
  """[num_classes, num_clusters] counts; rows/cols in sorted label order."""
  a, b = _pair(labels_true, labels_pred)
  _, class_idx = np.unique(a, return_inverse=True)
  _, cluster_idx = np.unique(b, return_inverse=True)
  table = np.zeros((class_idx.max() + 1, cluster_idx.max() + 1), np.int64)
  np.add.at(table, (class_idx, cluster_idx), 1)
  return table


def purity(labels_true, labels_pred) -> float:
  """Fraction of points whose class is their cluster's most frequent class."""
  table = contingency_matrix(labels_true, labels_pred)
  return float(table.max(axis=0).sum() / table.sum())


def nmi(labels_true, labels_pred) -> float:
  """Normalised mutual information (arithmetic normalisation, sklearn's default)."""
  a, b = _pair(labels_true, labels_pred)
  return float(metrics.normalized_mutual_info_score(a, b))


def ari(labels_true, labels_pred) -> float:
  """Adjusted Rand index (0 for chance agreement, 1 for identical partitions)."""
  a, b = _pair(labels_true, labels_pred)
  return float(metrics.adjusted_rand_score(a, b))
