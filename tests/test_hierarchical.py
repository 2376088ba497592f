"""Two-level k-means (deeper_jax.cluster.hierarchical) on real Fashion-MNIST features."""
import functools

import numpy as np
import pytest

from deeper_jax.cluster.hierarchical import bucket_rows, hierarchical_kmeans
from deeper_jax.cluster.kmeans import kmeans
from deeper_jax.data import load_fashion_mnist


@functools.lru_cache(maxsize=None)
def features(n: int = 1200) -> np.ndarray:
  """First n real training images, 4x4-average-pooled to 7x7 = 49 dims."""
  images = load_fashion_mnist("train").images(np.arange(n))
  x = images.reshape(n, 7, 4, 7, 4).astype(np.float32).mean((2, 4)) / 255.0
  return x.reshape(n, 49)


def sum_sq(x: np.ndarray) -> float:
  return float(((x.astype(np.float64) - x.mean(0)) ** 2).sum())


def test_labels_in_range_and_sizes_consistent():
  x = features()
  r = hierarchical_kmeans(x, 3, 8, seed=1)
  assert r.super_labels.dtype == np.int32 and r.sub_labels.dtype == np.int32
  assert r.super_labels.min() >= 0 and r.super_labels.max() < 3
  assert r.sub_labels.min() >= 0 and r.sub_labels.max() < 8
  np.testing.assert_array_equal(r.super_sizes, np.bincount(r.super_labels, minlength=3))
  assert r.sub_sizes.shape == (3, 8)
  for c in range(3):
    inside = r.sub_labels[r.super_labels == c]
    np.testing.assert_array_equal(r.sub_sizes[c], np.bincount(inside, minlength=8))
  assert r.sub_sizes.sum() == len(x)
  # Level 2 refines level 1: splitting each super-cluster cannot cost more.
  assert r.sub_objective < r.super_objective
  # The objective is measured to the last centroids, and cluster means are optimal
  # for the final labels: a little above the within-cluster sum of squares.
  within = sum(sum_sq(x[(r.super_labels == c) & (r.sub_labels == j)])
               for c in range(3) for j in range(8))
  assert within * (1 - 1e-6) <= r.sub_objective <= within * 1.01


def test_one_super_cluster_is_plain_kmeans():
  x = features()
  r = hierarchical_kmeans(x, 1, 10, seed=4)
  flat = kmeans(x, 10, seed=4)
  assert (r.super_labels == 0).all() and r.super_sizes.tolist() == [len(x)]
  assert r.super_objective == pytest.approx(sum_sq(x), rel=1e-5)
  np.testing.assert_array_equal(r.sub_labels, flat.assignments)
  np.testing.assert_array_equal(r.sub_sizes[0], flat.sizes)
  assert r.sub_objective == flat.objective


def test_one_sub_cluster_gives_zero_sub_labels():
  x = features()
  r = hierarchical_kmeans(x, 4, 1, seed=2)
  assert (r.sub_labels == 0).all()
  np.testing.assert_array_equal(r.sub_sizes[:, 0], r.super_sizes)
  # One sub-cluster = the super-cluster's own mean: at most the level-1 objective.
  assert r.sub_objective <= r.super_objective * (1 + 1e-6)
  expected = sum(sum_sq(x[r.super_labels == c]) for c in range(4))
  assert r.sub_objective == pytest.approx(expected, rel=1e-5)


def test_small_super_cluster_gets_as_many_sub_clusters_as_points():
  x = features().copy()
  x[:3] += 50.0  # three real images moved far away: their own super-cluster
  r = hierarchical_kmeans(x, 2, 5, seed=0, init="kmeans++")
  small = r.super_labels[0]
  assert r.super_sizes[small] == 3 and (r.super_labels[:3] == small).all()
  assert sorted(r.sub_labels[:3].tolist()) == [0, 1, 2]
  assert r.sub_sizes[small].tolist() == [1, 1, 1, 0, 0]
  assert (r.sub_sizes[1 - small] > 0).all()


def test_same_seed_same_labels():
  x = features()
  a, b = (hierarchical_kmeans(x, 3, 8, seed=1) for _ in range(2))
  np.testing.assert_array_equal(a.super_labels, b.super_labels)
  np.testing.assert_array_equal(a.sub_labels, b.sub_labels)


def test_invalid_arguments():
  x = features()
  with pytest.raises(ValueError, match=r"num_super=2000 is larger than the number of points"):
    hierarchical_kmeans(x, 2000, 2)
  with pytest.raises(ValueError, match=r"num_sub must be an integer >= 1"):
    hierarchical_kmeans(x, 2, 0)
  with pytest.raises(ValueError, match=r"init must be one of"):
    hierarchical_kmeans(x, 2, 2, init="nope")


def test_level_two_buffers_come_in_few_sizes_with_little_padding():
  """Super-cluster sizes change every cycle; bucketed buffers keep the compilations few."""
  sizes = range(16, 20_000)
  buckets = {bucket_rows(n) for n in sizes}
  assert all(n <= bucket_rows(n) <= n * 1.125 for n in sizes)
  assert len(buckets) < 120
  assert [bucket_rows(n) for n in (1, 7, 15)] == [1, 7, 15]


def test_each_super_cluster_is_plain_kmeans_of_its_own_points():
  """The zero-padded bucket buffer of level 2 changes nothing: same as k-means of the rows."""
  from deeper_jax.cluster.hierarchical import _sub_seed
  x = features()
  r = hierarchical_kmeans(x, 3, 4, seed=5)
  for c in range(3):
    rows = np.flatnonzero(r.super_labels == c)
    assert bucket_rows(len(rows)) > len(rows)  # padding really is present
    alone = kmeans(x[rows], 4, seed=_sub_seed(5, c))
    np.testing.assert_array_equal(r.sub_labels[rows], alone.assignments)
    np.testing.assert_array_equal(r.sub_sizes[c], alone.sizes)
