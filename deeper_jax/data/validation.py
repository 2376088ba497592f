"""A validation split carved out of a train split, for choosing hyper-parameters.

Tuning learning rates, cluster counts or probe settings against the test split
reports a test accuracy that was itself optimised: the number means less than
it says. ``config.data.validation_size > 0`` therefore holds out that many
labelled *train* images instead: the evaluators read them as their ``test``
split, and they are removed from every set a run trains on (the labelled split
of the probes, the pre-training set, the sources of the uncurated set's
near-duplicates), while the real test split is not read at all.

The held-out images are a class-stratified sample: each class gives its share
of ``size`` (largest remainders, ties broken at random), so that the validation
accuracy weighs the classes as the test split does. ``seed`` picks the images;
it is salted so that the choice is independent of the long tail's, which uses
the same ``config.data.seed``.
"""
from __future__ import annotations

import numpy as np

from deeper_jax.data.sources import UNLABELLED

_SEED_SALT = 0x7A11D  # keeps this stream apart from the long tail's (same data.seed)


def class_quotas(class_counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Images to take from each class: proportional shares of ``size`` that sum to it."""
  counts = np.asarray(class_counts, np.int64)
  shares = size * counts / counts.sum()
  quotas = np.floor(shares).astype(np.int64)
  remainders = shares - quotas
  order = np.lexsort((rng.random(len(counts)), -remainders))  # largest remainder first
  quotas[order[:size - quotas.sum()]] += 1
  return np.minimum(quotas, counts)


def stratified_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Sorted indices of ``size`` labelled images, stratified by class.

  Unlabelled images (-1) are never chosen: a validation image needs its label.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.")
  labelled = labels != UNLABELLED
  classes, counts = np.unique(labels[labelled], return_counts=True)
  if not 0 < size <= counts.sum():
    raise ValueError(f"a validation split needs 0 < size <= {counts.sum()} labelled images, "
                     f"got size {size}.")
  rng = np.random.default_rng(np.random.SeedSequence([_SEED_SALT, seed]))
  quotas = class_quotas(counts, size, rng)
  chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
            for c, q in zip(classes, quotas)]
  return np.sort(np.concatenate(chosen))
