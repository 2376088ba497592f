"""A long-tailed subset of a labelled set: the one-machine stand-in for YFCC100M.

DeeperCluster's point is pre-training on *uncurated* data, whose concept
distribution is heavily skewed, unlike ImageNet's balanced classes. We mimic
that by keeping class sizes that fall geometrically (Zipf-like on a log scale)
from the head class to the tail class:

    n_r = n_head * ratio ** (-r / (C - 1)),   r = 0 .. C-1 (rank of the class)

so the largest/smallest size is ``imbalance_ratio``. This is the usual
"CIFAR-10-LT" construction (Cao et al. 2019): by default class rank follows the
label order (class 0 is the head and keeps all its images, the last class is
the tail), so the subset's class sizes do not change with the seed, and runs
with different seeds differ only in *which* images of each class are kept.
Pass ``class_order`` to put another class at the head.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from deeper_jax.data.sources import UNLABELLED


def long_tail_sizes(class_counts: Sequence[int], imbalance_ratio: float) -> np.ndarray:
  """Kept images per rank: head keeps all its images, sizes fall geometrically.

  ``class_counts[r]`` is the number of available images of the class at rank
  ``r``; a class with fewer images than its target keeps all it has.
  """
  counts = np.asarray(class_counts, np.int64)
  if counts.ndim != 1 or counts.size == 0 or counts.min() <= 0:
    raise ValueError(f"class_counts must be a non-empty list of positive counts, got {counts}.")
  if not np.isfinite(imbalance_ratio) or imbalance_ratio < 1:
    raise ValueError(
        f"imbalance_ratio (config.data.imbalance_ratio) must be >= 1 (largest/smallest class "
        f"size; 1 = balanced), got {imbalance_ratio!r}.")
  num_classes = counts.size
  exponents = np.arange(num_classes) / max(num_classes - 1, 1)
  targets = np.round(counts[0] * float(imbalance_ratio) ** (-exponents)).astype(np.int64)
  return np.clip(np.minimum(targets, counts), 1, None)


def long_tail_indices(labels: np.ndarray, imbalance_ratio: float = 10.0, seed: int = 0, *,
                      class_order: Sequence[int] | None = None) -> np.ndarray:
  """Sorted indices of a long-tailed subset of ``labels``.

  Args:
    labels: int class ids ``[N]``.
    imbalance_ratio: head size / tail size (``config.data.imbalance_ratio``).
    seed: picks which images of each class are kept (uniformly, without
      replacement); the class sizes do not depend on it.
    class_order: classes from head to tail; default ascending label order.
      Classes not listed are dropped, and so are unlabelled images (label -1,
      ``sources.UNLABELLED``): the tail is a property of classes.

  Returns:
    ``int64`` indices into ``labels``, sorted (so the subset keeps the original
    order of the dataset).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}.")
  present = np.unique(labels[labels != UNLABELLED])
  if present.size == 0:
    raise ValueError("labels has no labelled image (all are -1); a long tail needs classes.")
  if class_order is None:
    order = present
  else:
    order = np.asarray(class_order)
    missing = np.setdiff1d(order, present)
    if missing.size or np.unique(order).size != order.size:
      raise ValueError(
          f"class_order must list distinct classes present in labels; bad entries: "
          f"{missing.tolist() or 'duplicates'}.")
  members = [np.flatnonzero(labels == c) for c in order]
  sizes = long_tail_sizes([len(m) for m in members], imbalance_ratio)
  rng = np.random.default_rng(seed)
  kept = [rng.choice(m, size=n, replace=False) for m, n in zip(members, sizes)]
  return np.sort(np.concatenate(kept))
