"""The epoch plan: N samples per epoch, layout, determinism, uniform sampling over sub-clusters.

Cluster labels come from real Fashion-MNIST structure: the long-tailed train
set (class sizes 6000 … 600), with super-cluster = class // 5 and sub-cluster
= class % 5, so the sub-clusters inside each super-cluster are very unbalanced
(up to 6000 vs 1670 and 1293 vs 600), as k-means clusters of uncurated data are.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from deeper_jax.data import epoch_plan, load_fashion_mnist, long_tail_indices, steps_per_epoch

R, M, B = 4, 2, 32  # rotations, super-clusters, images per super-class per step


@pytest.fixture(scope="module")
def clusters():
  labels = load_fashion_mnist("train").labels
  keep = long_tail_indices(labels, imbalance_ratio=10.0, seed=0)
  classes = labels[keep]
  return classes // 5, classes % 5


@pytest.fixture(scope="module")
def balanced():
  """Real, balanced clusters: Fashion-MNIST test classes 0..7 (1000 each), super = class // 2."""
  labels = load_fashion_mnist("test").labels
  classes = labels[labels < 8]
  return classes // 2, classes % 2


def plan_for(super_labels, sub_labels, *, seed=0, phase=0, cycle=0, epoch=0, rotations=R,
             supers=M, b=B):
  return epoch_plan(super_labels, sub_labels, num_super_clusters=supers, num_rotations=rotations,
                    batch_per_super=b, seed=seed, phase=phase, cycle=cycle, epoch=epoch)


def times_seen(plan, n):
  return np.bincount(plan.ravel(), minlength=n)


def proportional_plan(super_labels, rng, per_slice):
  """The sampler we must NOT be: images uniform inside the super-cluster."""
  return {c: rng.choice(np.flatnonzero(super_labels == c), per_slice) for c in range(M)}


def test_shape_dtype_and_range(clusters):
  super_labels, sub_labels = clusters
  n = len(super_labels)
  plan = plan_for(super_labels, sub_labels)
  steps = math.ceil(n / (R * M * B))  # an epoch is N samples, not N * R
  assert plan.shape == (steps, R * M, B) and plan.dtype == np.int32
  assert steps == steps_per_epoch(n, num_super_clusters=M, num_rotations=R, batch_per_super=B)
  assert plan.min() >= 0 and plan.max() < n


@pytest.mark.parametrize("n, rotations, supers, b, steps", [
    (24523, 4, 4, 16, 96),   # long-tailed Fashion-MNIST, paper layout: 24523 / 256 = 95.8
    (24576, 4, 4, 16, 96),   # divides evenly: exactly N samples, no extra step
    (24577, 4, 4, 16, 97),   # one image more: one step more
    (24523, 1, 4, 16, 384),  # no rotation task: S = m = 4 slices of 16
    (1000, 1, 1, 64, 16),    # DeepCluster's flat sampler
])
def test_steps_per_epoch_is_ceil_n_over_s_times_b(n, rotations, supers, b, steps):
  assert steps_per_epoch(n, num_super_clusters=supers, num_rotations=rotations,
                         batch_per_super=b) == steps
  super_labels = np.arange(n) % supers
  sub_labels = np.arange(n) // supers % 7
  plan = plan_for(super_labels, sub_labels, rotations=rotations, supers=supers, b=b)
  assert plan.shape == (steps, rotations * supers, b)
  assert n <= plan.size < n + rotations * supers * b  # N samples, rounded up to whole steps


def test_same_arguments_same_plan_any_argument_changes_it(clusters):
  args = dict(seed=1, phase=1, cycle=2, epoch=3)
  plan = plan_for(*clusters, **args)
  np.testing.assert_array_equal(plan, plan_for(*clusters, **args))
  for field in args:
    changed = dict(args, **{field: args[field] + 1})
    assert not np.array_equal(plan, plan_for(*clusters, **changed)), changed
  # phase is part of the seed: the RotNet warm-up (phase 0) and the clustering phase
  # (phase 1) at the same cycle and epoch train on different streams.
  assert not np.array_equal(plan_for(*clusters, phase=0), plan_for(*clusters, phase=1))


def test_each_slice_holds_only_its_super_cluster(clusters):
  super_labels, _ = clusters
  plan = plan_for(*clusters)
  for s in range(R * M):
    assert np.all(super_labels[plan[:, s]] == s // R), f"slice {s}"


def test_rotations_of_one_super_cluster_share_out_its_images(balanced):
  super_labels, sub_labels = balanced
  plan = plan_for(super_labels, sub_labels, supers=4, b=16)
  for c in range(4):
    slices = [set(plan[:, R * c + r].ravel().tolist()) for r in range(R)]
    # The rotations split one draw of 2048 from the 2000 images: they share only the
    # 48 images drawn twice (four independent draws of 512 would share ~790).
    overlap = sum(len(slices[i] & slices[j]) for i in range(R) for j in range(i + 1, R))
    assert overlap <= plan[:, R * c:R * c + R].size - 2000, overlap
    # ... and cover the same sub-clusters equally (same multiset of sub-cluster counts).
    counts = [np.sort(np.bincount(sub_labels[plan[:, R * c + r].ravel()])) for r in range(R)]
    for other in counts[1:]:
      np.testing.assert_array_equal(counts[0], other)


def test_each_image_seen_about_once_per_epoch_with_balanced_clusters(balanced):
  super_labels, sub_labels = balanced
  n = len(super_labels)  # 8000
  for epoch in range(3):
    plan = plan_for(super_labels, sub_labels, supers=4, b=16, epoch=epoch)
    seen = times_seen(plan, n)
    # 32 steps x 16 slices x 16 = 8192 samples for 8000 images: every image once,
    # 192 of them twice; never three times, never missed.
    assert seen.min() >= 1 and seen.max() <= 2, np.bincount(seen)
    assert abs(seen.mean() - 1) < 0.03
    assert (seen == 2).sum() == plan.size - n


def test_each_image_seen_about_once_per_epoch_without_rotations(balanced):
  super_labels, sub_labels = balanced
  seen = times_seen(plan_for(super_labels, sub_labels, rotations=1, supers=4, b=48), 8000)
  assert seen.min() >= 1 and seen.max() <= 2 and abs(seen.mean() - 1) < 0.03


def test_long_tailed_clusters_seen_once_per_epoch_on_average(clusters):
  super_labels, sub_labels = clusters
  n = len(super_labels)
  plan = plan_for(*clusters)
  seen = times_seen(plan, n)
  assert 1 <= seen.mean() < 1 + R * M * B / n
  # Uniform over sub-clusters: each sub-cluster gets R * steps * B / 5 draws, so images
  # of sub-clusters smaller than that are all seen (some several times) and the
  # largest sub-cluster (6000 images) is only partly seen.
  share = R * plan.shape[0] * B // 5
  for c in range(M):
    for k in range(5):
      members = (super_labels == c) & (sub_labels == k)
      if members.sum() <= share:
        assert seen[members].min() >= share // members.sum(), (c, k)
  assert (seen[(super_labels == 0) & (sub_labels == 0)] == 0).any()


def test_sub_clusters_uniform_despite_unbalanced_sizes(clusters):
  super_labels, sub_labels = clusters
  plan = plan_for(*clusters)
  rng = np.random.default_rng(0)
  proportional = proportional_plan(super_labels, rng, plan.shape[0] * B)
  for c in range(M):
    sizes = np.bincount(sub_labels[super_labels == c], minlength=5)
    assert sizes.max() / sizes.min() > 2, "the test needs unbalanced sub-clusters"
    for r in range(R):
      counts = np.bincount(sub_labels[plan[:, R * c + r].ravel()], minlength=5)
      assert counts.max() - counts.min() <= 1, counts  # equal shares (±1 for the remainder)
      assert stats.chisquare(counts).pvalue > 0.5
    # Negative control: sampling images uniformly is rejected by the same test.
    counts = np.bincount(sub_labels[proportional[c]], minlength=5)
    assert stats.chisquare(counts).pvalue < 1e-6


def test_images_uniform_inside_a_sub_cluster_over_epochs():
  """Within a sub-cluster larger than its share, every image is equally likely."""
  sub_labels = np.r_[np.zeros(400, np.int64), np.ones(40, np.int64)]
  super_labels = np.zeros_like(sub_labels)
  hits = np.zeros(len(sub_labels), np.int64)
  for epoch in range(50):
    plan = plan_for(super_labels, sub_labels, epoch=epoch, rotations=1, supers=1, b=20)
    drawn = plan.ravel()
    big = drawn[sub_labels[drawn] == 0]
    assert len(np.unique(big)) == len(big), "no repeats when the share fits in the sub-cluster"
    hits += np.bincount(drawn, minlength=len(sub_labels))
  # 220 draws per epoch from the 400-image cluster: 50 epochs → 27.5 hits per image.
  assert stats.chisquare(hits[:400]).pvalue > 1e-3
  # The 40-image cluster gets 220 draws per epoch: each image 5 or 6 times, every epoch.
  assert np.all(hits[400:] >= 5 * 50) and np.all(hits[400:] <= 6 * 50)


def test_small_sub_cluster_is_tiled_not_resampled():
  sub_labels = np.r_[np.zeros(1000, np.int64), np.full(3, 7)]  # ids need not be contiguous
  super_labels = np.zeros_like(sub_labels)
  plan = plan_for(super_labels, sub_labels, rotations=1, supers=1, b=25)
  drawn = plan.ravel()
  counts = np.bincount(drawn, minlength=len(sub_labels))
  share = len(drawn) // 2
  assert np.all(counts[1000:] >= share // 3) and np.all(counts[1000:] <= share // 3 + 1)
  assert abs(int((sub_labels[drawn] == 7).sum()) - share) <= 1


def test_deepcluster_setting_flat_and_no_rotation(clusters):
  _, sub_labels = clusters
  classes = sub_labels  # any labels; m=1, R=1 is DeepCluster's flat sampler
  plan = plan_for(np.zeros_like(classes), classes, rotations=1, supers=1, b=64)
  assert plan.shape == (math.ceil(len(classes) / 64), 1, 64)
  counts = np.bincount(classes[plan.ravel()])
  assert counts.max() - counts.min() <= 1


def test_empty_super_cluster_is_an_error(clusters):
  super_labels, sub_labels = clusters
  with pytest.raises(ValueError, match=r"super-cluster\(s\) \[2\]"):
    plan_for(super_labels, sub_labels, supers=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_super_clusters=0), "num_super_clusters"),
    (dict(num_rotations=0), "num_rotations"),
    (dict(batch_per_super=0), "batch_per_super"),
    (dict(seed=-1), "seed"),
    (dict(phase=-1), "phase"),
    (dict(epoch=1.5), "epoch"),
])
def test_bad_arguments(kwargs, match):
  args = dict(num_super_clusters=1, num_rotations=4, batch_per_super=8, seed=0, phase=0, cycle=0,
              epoch=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    epoch_plan(np.zeros(10, np.int32), np.zeros(10, np.int32), **args)


def test_bad_labels():
  args = dict(num_super_clusters=2, num_rotations=1, batch_per_super=4, seed=0, phase=0, cycle=0,
              epoch=0)
  with pytest.raises(ValueError, match="equal length"):
    epoch_plan(np.zeros(10, np.int32), np.zeros(9, np.int32), **args)
  with pytest.raises(ValueError, match=r"\[0, num_super_clusters=2\)"):
    epoch_plan(np.full(10, 2), np.zeros(10, np.int32), **args)
  with pytest.raises(ValueError, match="no image has a target"):
    epoch_plan(np.r_[np.zeros(5, int), np.ones(5, int)], np.full(10, -1), **args)
  with pytest.raises(ValueError, match=r"≥ 0, or -1 for an image without a target"):
    epoch_plan(np.r_[np.zeros(5, int), np.ones(5, int)], np.full(10, -2), **args)
  with pytest.raises(ValueError, match="integer"):
    epoch_plan(np.zeros(10), np.zeros(10, np.int32), **args)


def test_images_without_a_target_are_never_sampled_nor_counted():
  """sub_label -1 (an unlabelled image when training on labels) is left out."""
  sub = np.r_[np.arange(90) % 3, np.full(10, -1)]
  plan = epoch_plan(np.zeros(100, int), sub, num_super_clusters=1, num_rotations=1,
                    batch_per_super=10, seed=0, phase=0, cycle=0, epoch=0)
  assert plan.shape == (9, 1, 10)  # ceil(90 / 10) steps: the 10 untargeted images don't count
  assert plan.max() < 90
