"""Evaluation building blocks: pooling rule, cluster metrics, kNN, pictures.

Linear probes and fine-tuning: test_evaluate_probe.py; the whole suite:
test_evaluate_suite.py.
"""
import math

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

import jax.numpy as jnp

from deeper_jax.data.fashion_mnist import load_fashion_mnist
from deeper_jax.evaluate import cluster_metrics
from deeper_jax.evaluate.cluster_grid import choose_clusters, save_cluster_grids
from deeper_jax.evaluate.features import adaptive_avg_pool, pool_features, pool_to_dim
from deeper_jax.evaluate.knn import knn_accuracy, knn_predict
from deeper_jax.evaluate.linear_probe import plot_probe_by_layer


@pytest.fixture(scope="module")
def fmnist():
  train = load_fashion_mnist("train")
  test = load_fashion_mnist("test")
  return train, test


def pixels(source, n):
  return source.images(np.arange(n)).reshape(n, -1).astype(np.float32) / 255.0


# --- pooling rule -------------------------------------------------------------

# VGG-16 blocks (after each max-pool) at 224 px -> pooled shape; the last one is
# the paper's "8192 dimensions" of Table 3.
VGG16_224 = {
    "conv1": ((112, 112, 64), (12, 12, 64), 9216),
    "conv2": ((56, 56, 128), (8, 8, 128), 8192),
    "conv3": ((28, 28, 256), (6, 6, 256), 9216),
    "conv4": ((14, 14, 512), (4, 4, 512), 8192),
    "conv5": ((7, 7, 512), (4, 4, 512), 8192),
}


@pytest.mark.parametrize("block", sorted(VGG16_224))
def test_pool_to_dim_gives_the_promised_vgg16_dims(block):
  shape, pooled, dim = VGG16_224[block]
  assert pool_to_dim(shape) == pooled
  assert math.prod(pooled) == dim < 10_000
  # Largest such side: one more cell per side would reach 10k.
  side = pooled[0] + 1
  assert side * side * shape[2] >= 10_000


def test_pool_to_dim_leaves_small_blocks_and_global_pools_wide_ones():
  assert pool_to_dim((14, 14, 32)) == (14, 14, 32)  # 6272: already below
  assert pool_to_dim((3, 3, 128)) == (3, 3, 128)
  assert pool_to_dim((1, 1, 20000)) == (1, 1, 20000)  # cannot go below: 1x1
  assert pool_to_dim((4, 4, 20000)) == (1, 1, 20000)
  assert pool_to_dim((10, 20, 64), max_dim=2000) == (5, 5, 64)  # 5*5*64=1600
  assert pool_to_dim((2, 40, 100), max_dim=1000) == (2, 4, 100)
  with pytest.raises(ValueError, match="shape_hwc"):
    pool_to_dim((7, 7))


def test_adaptive_pool_averages_the_pytorch_bins():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
  out = np.asarray(adaptive_avg_pool(jnp.asarray(x), (4, 4)))
  # Bins of 7 -> 4: [0,2), [1,4), [3,6), [5,7).
  bins = [(0, 2), (1, 4), (3, 6), (5, 7)]
  for i, (a, b) in enumerate(bins):
    for j, (c, d) in enumerate(bins):
      np.testing.assert_allclose(out[:, i, j], x[:, a:b, c:d].mean(axis=(1, 2)),
                                 rtol=1e-5, atol=1e-6)
  # Divisible sizes: plain non-overlapping 2x2 mean pooling.
  y = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  expected = y.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(y), (2, 2))),
                             expected, rtol=1e-5, atol=1e-6)


def test_pool_features_flattens_below_max_dim():
  x = jnp.ones((3, 14, 14, 512))
  out = pool_features(x)
  assert out.shape == (3, 8192)
  np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)


# --- cluster metrics ------------------------------------------------------------

TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2])
PRED = np.array([5, 5, 7, 7, 7, 7, 9, 5])


def test_contingency_and_purity_by_hand():
  # clusters 5: classes {0,0,2}; 7: {0,1,1,1}; 9: {2}.
  np.testing.assert_array_equal(cluster_metrics.contingency_matrix(TRUE, PRED),
                                [[2, 1, 0], [0, 3, 0], [1, 0, 1]])
  assert cluster_metrics.purity(TRUE, PRED) == pytest.approx((2 + 3 + 1) / 8)
  assert cluster_metrics.purity(TRUE, TRUE) == 1.0
  assert cluster_metrics.purity(TRUE, np.zeros(8)) == pytest.approx(3 / 8)


def test_nmi_and_ari_equal_scikit_learn():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 5, 200)
  b = np.where(rng.random(200) < 0.7, a, rng.integers(0, 7, 200))
  for x, y in ((TRUE, PRED), (a, b)):
    assert cluster_metrics.nmi(x, y) == pytest.approx(skm.normalized_mutual_info_score(x, y))
    assert cluster_metrics.ari(x, y) == pytest.approx(skm.adjusted_rand_score(x, y))
  # Renaming clusters changes nothing; identical partitions score 1.
  assert cluster_metrics.nmi(TRUE, PRED) == pytest.approx(cluster_metrics.nmi(TRUE, PRED + 100))
  assert cluster_metrics.nmi(TRUE, 3 - TRUE) == pytest.approx(1.0)
  assert cluster_metrics.ari(TRUE, 3 - TRUE) == pytest.approx(1.0)


def test_metrics_reject_mismatched_lengths():
  with pytest.raises(ValueError, match="same length"):
    cluster_metrics.purity(TRUE, PRED[:-1])
  with pytest.raises(ValueError, match="same length"):
    cluster_metrics.nmi(TRUE, PRED[:-1])


# --- kNN ------------------------------------------------------------------------


def test_knn_on_real_fashion_mnist_pixels_is_sensible(fmnist):
  train, test = fmnist
  xtr, xte = pixels(train, 10_000), pixels(test, 2_000)
  ytr, yte = train.labels[:10_000], test.labels[:2_000]
  weighted = knn_accuracy(xtr, ytr, xte, yte, k=20)
  majority = knn_accuracy(xtr, ytr, xte, yte, k=20, weighting="majority")
  # DESIGN §6: 84.1% with all 60k training images; a 10k bank loses a little.
  assert 0.70 < weighted < 0.95
  assert 0.70 < majority < 0.95
  shuffled = knn_accuracy(xtr, np.random.default_rng(0).permutation(ytr), xte, yte)
  assert shuffled < 0.2


def test_knn_is_cosine_and_chunking_changes_nothing():
  rng = np.random.default_rng(0)
  centres = np.eye(4, 16, dtype=np.float32) * 10
  labels = np.repeat(np.arange(4), 30)
  train = centres[labels] + rng.normal(size=(120, 16)).astype(np.float32)
  test = centres[np.arange(4)] * 0.01  # tiny norm: only the direction counts
  np.testing.assert_array_equal(knn_predict(train, labels, test, k=5), np.arange(4))
  queries = train[::3] + 0.5 * rng.normal(size=(40, 16)).astype(np.float32)
  np.testing.assert_array_equal(knn_predict(train, labels, queries, chunk_size=7),
                                knn_predict(train, labels, queries, chunk_size=512))


# --- pictures ---------------------------------------------------------------------


def assert_png_shows_data(path):
  image = np.asarray(Image.open(path).convert("RGB"), np.float32)
  assert image.shape[0] > 100 and image.shape[1] > 100
  assert image.std() > 20  # not blank
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # more than a few colours


def test_cluster_grid_png_shows_members_of_the_chosen_clusters(fmnist, tmp_path):
  train, _ = fmnist
  n = 3000
  # A clustering whose clusters have known sizes: classes, with class 3 split off.
  labels = train.labels[:n].astype(np.int64)
  labels = np.where((labels == 3) & (np.arange(n) % 4 == 0), 10, labels)
  chosen = choose_clusters(labels, num_random=4, seed=0)
  sizes = np.bincount(labels)
  assert chosen[0] == ("largest", int(np.argmax(sizes)), int(sizes.max()))
  assert chosen[1] == ("smallest", 10, int(sizes[10]))
  assert [role for role, _, _ in chosen[2:]] == ["random"] * 4
  assert len({c for _, c, _ in chosen}) == 6
  path = tmp_path / "clusters.png"
  drawn = save_cluster_grids(train.images(np.arange(n)), labels, str(path),
                             num_random=4, per_cluster=16, seed=0)
  assert drawn == chosen
  assert_png_shows_data(path)
  # A source instead of an array gives the same picture.
  path2 = tmp_path / "clusters_from_source.png"
  save_cluster_grids(train.subset(np.arange(n)), labels, str(path2), seed=0)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(path2)))


def test_cluster_grid_rejects_wrong_label_count(fmnist, tmp_path):
  train, _ = fmnist
  with pytest.raises(ValueError, match="one label per image"):
    save_cluster_grids(train.images(np.arange(10)), np.zeros(9, int),
                       str(tmp_path / "x.png"))


def test_probe_plot_png_shows_data(tmp_path):
  path = tmp_path / "probe.png"
  plot_probe_by_layer({"conv1": 0.61, "conv2": 0.72, "conv3": 0.78, "features": 0.7},
                      str(path), chance=0.1)
  assert_png_shows_data(path)
  with pytest.raises(ValueError, match="empty"):
    plot_probe_by_layer({}, str(path))

