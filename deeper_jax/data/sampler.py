"""Which images each step trains on: uniform over sub-clusters, per super-class.

A training batch is laid out ``[S, b]``: slice ``s`` holds ``b`` images of one
super-class, ``s = R * c + r`` = super-cluster ``c`` seen under rotation ``r``
(``S = R * m``). That layout is what lets the paper put each super-class's
sub-head on its own group of devices.

Uniform over sub-clusters (DeepCluster's ``UnifLabelSampler``, kept by
DeeperCluster): k-means on uncurated data makes a few huge clusters and many
tiny ones; sampling images uniformly would let the huge clusters dominate the
loss and collapse the representation onto them. So inside each super-class
every *non-empty* sub-cluster gets an equal share of the super-class's samples
(shares differ by at most one; the sub-clusters that get one extra are drawn at
random), and images are drawn inside their sub-cluster.

Epoch length, as the reference code: ``N`` samples overall, each image seen about
once per epoch (``src/utils.py``: ``epoch_size = N // m // 4`` samples for each of
the 4m training groups). The N samples are split evenly over the ``S``
super-classes and rounded up to whole steps: ``steps = ceil(N / (S * b))``,
``steps * b`` samples per slice. So super-classes are also sampled uniformly,
whatever their sizes.

The ``R`` rotations of one super-cluster are drawn *together*: the ``R * steps * b``
samples of super-cluster ``c`` are drawn at once (equal shares per sub-cluster),
then dealt out to its ``R`` slices, each slice again getting an equal share (±1)
of every sub-cluster. The reference draws each group independently (with
replacement), so an image can be seen under several rotations and another under
none; dealing one joint draw means that with balanced clusters every image is
seen once or twice per epoch.

Inside a sub-cluster whose (joint) share ``q`` exceeds its size ``n``, the
reference draws with replacement. We instead take every member ``q // n`` times
plus a uniform subset (without replacement) of ``q % n`` members: the same
expected counts, but every image of a small cluster is seen and no image is
repeated more than needed. A sub-cluster larger than its share gets a uniform
subset without replacement.

Empty super-cluster: the reference k-means never returns one when ``N >= m``
(it splits a non-empty cluster instead), and a slice must hold images of *its*
super-cluster, so an empty one is an upstream bug and raises ``ValueError``
rather than being silently filled with other images.

Determinism: super-cluster ``c`` draws from ``np.random.default_rng([seed, phase,
cycle, epoch, c])``, so the plan is a pure function of its arguments (a resumed
run replays it exactly) and super-clusters are independent streams.
"""
from __future__ import annotations

import math

import numpy as np


def steps_per_epoch(num_images: int, *, num_super_clusters: int, num_rotations: int,
                    batch_per_super: int) -> int:
  """``ceil(N / (S * b))`` with ``S = R * m``: N samples per epoch."""
  num_slices = num_rotations * num_super_clusters
  return math.ceil(num_images / (num_slices * batch_per_super))


def _check_args(super_labels, sub_labels, num_super_clusters, num_rotations, batch_per_super,
                seed, phase, cycle, epoch) -> tuple[np.ndarray, np.ndarray]:
  for name, value, low in (("num_super_clusters", num_super_clusters, 1),
                           ("num_rotations", num_rotations, 1),
                           ("batch_per_super", batch_per_super, 1), ("seed", seed, 0),
                           ("phase", phase, 0), ("cycle", cycle, 0), ("epoch", epoch, 0)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"epoch_plan: {name} must be an integer >= {low}, got {value!r}.")
  super_labels, sub_labels = np.asarray(super_labels), np.asarray(sub_labels)
  if super_labels.ndim != 1 or super_labels.size == 0 or sub_labels.shape != super_labels.shape:
    raise ValueError(
        f"super_labels and sub_labels must be non-empty 1-D arrays of equal length, got shapes "
        f"{super_labels.shape} and {sub_labels.shape}.")
  for name, labels in (("super_labels", super_labels), ("sub_labels", sub_labels)):
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name} must be integer cluster ids, got dtype {labels.dtype}.")
  if super_labels.min() < 0 or super_labels.max() >= num_super_clusters:
    raise ValueError(
        f"super_labels must lie in [0, num_super_clusters={num_super_clusters}), got range "
        f"[{super_labels.min()}, {super_labels.max()}].")
  if sub_labels.min() < -1:
    raise ValueError(f"sub_labels must be ≥ 0, or -1 for an image without a target; got min "
                     f"{sub_labels.min()}.")
  if (sub_labels < 0).all():
    raise ValueError("every sub_label is -1: no image has a target to train on.")
  if super_labels.size >= 2**31:
    raise ValueError(f"epoch_plan returns int32 indices; {super_labels.size} images is too many.")
  return super_labels.astype(np.int64), sub_labels.astype(np.int64)


def _shares(rng: np.random.Generator, num_groups: int, num_rotations: int,
            per_slice: int) -> np.ndarray:
  """``int64 [R, G]``: samples of each sub-cluster in each rotation's slice.

  Every row sums to ``per_slice`` with entries ``per_slice // G`` or one more. The
  ``e = per_slice % G`` extras of rotation ``r`` go to positions ``r*e .. r*e+e-1``
  (cyclically) of one random order of the groups, so the column totals (the joint
  draw of each sub-cluster) also differ by at most one.
  """
  shares = np.full((num_rotations, num_groups), per_slice // num_groups, np.int64)
  extra = per_slice % num_groups
  if extra:
    order = rng.permutation(num_groups)
    for r in range(num_rotations):
      shares[r, order[(r * extra + np.arange(extra)) % num_groups]] += 1
  return shares


def _draw_super_cluster(rng: np.random.Generator, members: np.ndarray, group: np.ndarray,
                        sizes: np.ndarray, starts: np.ndarray, num_rotations: int,
                        per_slice: int) -> np.ndarray:
  """``[R, per_slice]`` image indices: one joint draw dealt to the R slices, each shuffled.

  ``members`` are the images of one super-cluster sorted by sub-cluster;
  ``group[i]`` is the (dense) sub-cluster of ``members[i]``, ``sizes``/``starts``
  describe the groups. Vectorised over groups: k_sub can be ~10^5.
  """
  shares = _shares(rng, len(sizes), num_rotations, per_slice)
  totals = shares.sum(axis=0)
  tiles, rest = totals // sizes, totals % sizes
  # Every member tiles[g] times, plus a uniform subset without replacement of
  # rest[g] members of each group g: rank members by a random key within their
  # group, keep ranks < rest[g].
  order = np.lexsort((rng.random(len(members)), group))
  rank = np.arange(len(members)) - starts[group[order]]
  keep = rank < rest[group[order]]
  drawn = np.concatenate([np.repeat(members, tiles[group]), members[order][keep]])
  drawn_group = np.concatenate([np.repeat(group, tiles[group]), group[order][keep]])
  # Random order inside each group, then deal: the first shares[0, g] of group g
  # go to rotation 0, the next shares[1, g] to rotation 1, ...
  order = np.lexsort((rng.random(len(drawn)), drawn_group))
  drawn, drawn_group = drawn[order], drawn_group[order]
  group_start = np.r_[0, np.cumsum(totals)[:-1]]
  position = np.arange(len(drawn)) - group_start[drawn_group]
  bounds = np.cumsum(shares, axis=0)  # [R, G]
  rotation = (position[None, :] >= bounds[:, drawn_group]).sum(axis=0)
  out = np.empty((num_rotations, per_slice), np.int64)
  for r in range(num_rotations):
    out[r] = rng.permutation(drawn[rotation == r])
  return out


def epoch_plan(super_labels: np.ndarray, sub_labels: np.ndarray, *, num_super_clusters: int,
               num_rotations: int, batch_per_super: int, seed: int, cycle: int,
               epoch: int, phase: int = 0) -> np.ndarray:
  """Image indices for every step of one epoch, ``int32 [steps, S, b]``.

  Args:
    super_labels: ``[N]`` level-1 cluster of each image, in ``[0, m)``.
    sub_labels: ``[N]`` level-2 cluster of each image, local to its
      super-cluster (any non-negative ids; only non-empty ones are sampled);
      -1 marks an image without a target (e.g. unlabelled when training on labels),
      which is never sampled and not counted in the epoch's N.
    num_super_clusters: ``m``.
    num_rotations: ``R`` (4, or 1 without the rotation task).
    batch_per_super: ``b``, images per super-class per step.
    seed, cycle, epoch, phase: the plan is a deterministic function of these.

  Returns:
    ``plan[t, s]``: the ``b`` images of super-class ``s`` (super-cluster
    ``s // R``, to be rotated by ``(s % R) * 90`` degrees) at step ``t``.
  """
  super_labels, sub_labels = _check_args(super_labels, sub_labels, num_super_clusters,
                                         num_rotations, batch_per_super, seed, phase, cycle,
                                         epoch)
  targets = np.flatnonzero(sub_labels >= 0)
  num_images = targets.size
  steps = steps_per_epoch(num_images, num_super_clusters=num_super_clusters,
                          num_rotations=num_rotations, batch_per_super=batch_per_super)
  per_slice = steps * batch_per_super
  num_slices = num_rotations * num_super_clusters
  plan = np.empty((steps, num_slices, batch_per_super), np.int32)

  # Images sorted by (super, sub); each super-cluster is then one contiguous run.
  order = targets[np.lexsort((sub_labels[targets], super_labels[targets]))]
  sorted_super, sorted_sub = super_labels[order], sub_labels[order]
  super_bounds = np.searchsorted(sorted_super, np.arange(num_super_clusters + 1))
  empty = np.flatnonzero(np.diff(super_bounds) == 0)
  if empty.size:
    raise ValueError(
        f"epoch_plan: super-cluster(s) {empty.tolist()} of num_super_clusters={num_super_clusters} "
        f"have no images among the {num_images}; every super-class needs images (hierarchical "
        "k-means splits empty clusters; use fewer super-clusters than images).")

  for cluster in range(num_super_clusters):
    lo, hi = super_bounds[cluster], super_bounds[cluster + 1]
    members, subs = order[lo:hi], sorted_sub[lo:hi]
    is_start = np.r_[True, subs[1:] != subs[:-1]]
    group = np.cumsum(is_start) - 1  # dense id of the non-empty sub-cluster
    starts = np.flatnonzero(is_start)
    sizes = np.diff(np.r_[starts, len(members)])
    rng = np.random.default_rng([seed, phase, cycle, epoch, cluster])
    drawn = _draw_super_cluster(rng, members, group, sizes, starts, num_rotations, per_slice)
    for rotation in range(num_rotations):
      s = num_rotations * cluster + rotation
      plan[:, s, :] = drawn[rotation].reshape(steps, batch_per_super)
  return plan
