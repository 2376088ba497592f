"""k-means (deeper_jax.cluster.kmeans): what it must do, on real Fashion-MNIST features."""
import functools
import re

import numpy as np
import pytest

from deeper_jax.cluster import kmeans as kmeans_lib
from deeper_jax.cluster.kmeans import kmeans
from deeper_jax.cluster.lloyd import SPLIT_EPS, split_empty_clusters
from deeper_jax.data import load_fashion_mnist

# Most tests share one problem size so that they share one compilation.
N, K = 2000, 25


@functools.lru_cache(maxsize=None)
def _fmnist_train_pixels() -> np.ndarray:
  """Fashion-MNIST training images as uint8 [60000, 784] (read once per process)."""
  source = load_fashion_mnist("train")
  return source.images(np.arange(len(source))).reshape(-1, 784)


@functools.lru_cache(maxsize=None)
def _principal_axes(d: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean and top-d principal axes of the first 1000 training images."""
  pixels = _fmnist_train_pixels()[:1000].astype(np.float64) / 255.0
  mean = pixels.mean(axis=0)
  _, vectors = np.linalg.eigh((pixels - mean).T @ (pixels - mean))
  return mean, vectors[:, ::-1][:, :d]


@functools.lru_cache(maxsize=None)
def fmnist_features(n: int, d: int = 32) -> np.ndarray:
  """The first n real training images projected on d principal axes (PCA'd pixels)."""
  mean, axes = _principal_axes(d)
  pixels = _fmnist_train_pixels()[:n].astype(np.float64) / 255.0
  return np.ascontiguousarray((pixels - mean) @ axes, dtype=np.float32)


def distinct_rows(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
  return x[np.sort(np.random.default_rng(seed).choice(len(x), size=k, replace=False))]


def inertia(x, centroids, labels) -> float:
  diff = x.astype(np.float64) - centroids[labels].astype(np.float64)
  return float(np.sum(diff * diff))


def test_objective_matches_sklearn_lloyd_from_same_init():
  from sklearn.cluster import KMeans
  x = fmnist_features(N)
  c0 = distinct_rows(x, K)
  ours = kmeans(x, K, num_iters=10, init_centroids=c0)
  ref = KMeans(K, init=c0, n_init=1, max_iter=10, tol=0, algorithm="lloyd").fit(x)
  assert ours.objective == pytest.approx(ref.inertia_, rel=1e-4)
  assert np.mean(ours.assignments == ref.labels_) > 0.99
  np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, atol=1e-3)


def test_result_is_self_consistent():
  x = fmnist_features(N)
  r = kmeans(x, K, seed=3)
  assert r.assignments.shape == (N,) and r.assignments.dtype == np.int32
  assert r.centroids.shape == (K, 32) and r.centroids.dtype == np.float32
  assert r.sizes.dtype == np.int32 and r.sizes.sum() == N
  np.testing.assert_array_equal(r.sizes, np.bincount(r.assignments, minlength=K))
  assert r.objective == pytest.approx(inertia(x, r.centroids, r.assignments), rel=1e-6)
  # The final pass assigns every point to its nearest centroid.
  dists = ((x[:, None, :] - r.centroids[None]) ** 2).sum(-1)
  np.testing.assert_allclose(dists[np.arange(N), r.assignments], dists.min(1), rtol=1e-5,
                             atol=1e-5)


def test_same_seed_same_result_and_seed_matters():
  x = fmnist_features(N)
  a, b, c = (kmeans(x, K, seed=s) for s in (7, 7, 8))
  np.testing.assert_array_equal(a.assignments, b.assignments)
  np.testing.assert_array_equal(a.centroids, b.centroids)
  assert a.objective == b.objective
  assert not np.array_equal(a.centroids, c.centroids)


def test_random_init_uses_distinct_data_points():
  x = fmnist_features(N)
  r = kmeans(x, K, num_iters=0, seed=1)  # no iteration: the centroids are the init
  rows = {row.tobytes() for row in x}
  assert all(c.tobytes() in rows for c in r.centroids)
  assert len({c.tobytes() for c in r.centroids}) == K


def test_kmeans_plus_plus_init_picks_distinct_points_and_is_deterministic():
  x = fmnist_features(N)
  a = kmeans(x, K, num_iters=0, init="kmeans++", seed=2)
  b = kmeans(x, K, num_iters=0, init="kmeans++", seed=2)
  rows = {row.tobytes() for row in x}
  assert all(c.tobytes() in rows for c in a.centroids)
  assert len({c.tobytes() for c in a.centroids}) == K
  np.testing.assert_array_equal(a.centroids, b.centroids)
  # D^2 sampling spreads the seeds: lower initial objective than random points on average.
  random_obj = np.mean([kmeans(x, K, num_iters=0, seed=s).objective for s in range(3)])
  pp_obj = np.mean([kmeans(x, K, num_iters=0, init="kmeans++", seed=s).objective
                    for s in range(3)])
  assert pp_obj < random_obj


def test_chunked_equals_unchunked(monkeypatch):
  x = fmnist_features(N)
  c0 = distinct_rows(x, K)
  monkeypatch.setattr(kmeans_lib, "MAX_BLOCK_ROWS", 1 << 20)
  whole = kmeans(x, K, init_centroids=c0, chunk_size=N)     # one block of all rows
  chunked = kmeans(x, K, init_centroids=c0, chunk_size=37)  # 54 blocks and a tail
  np.testing.assert_array_equal(whole.assignments, chunked.assignments)
  np.testing.assert_array_equal(whole.centroids, chunked.centroids)
  np.testing.assert_array_equal(whole.sizes, chunked.sizes)
  assert whole.objective == chunked.objective


def test_pruned_passes_give_exactly_the_plain_lloyd_result(caplog):
  """Bounds (Yinyang) and the unmoved-centroid shortcut only skip provably idle work."""
  import logging as py_logging
  from absl import logging
  x = fmnist_features(N)
  c0 = distinct_rows(x, K)
  logging.set_verbosity(1)  # vlog(1) reports how many rows each pass skipped
  try:
    with caplog.at_level(py_logging.DEBUG):
      pruned = kmeans(x, K, init_centroids=c0, num_iters=15)
  finally:
    logging.set_verbosity(logging.WARNING)
  work = [tuple(int(v) for v in re.search(
      r"rows skipped (\d+), checked against moved centroids (\d+), fully scored (\d+)",
      r.getMessage()).groups()) for r in caplog.records if "rows skipped" in r.getMessage()]
  assert len(work) == 15
  assert sum(w[0] for w in work) > 0 and sum(w[1] for w in work) > 0  # both paths taken
  assert sum(w[2] for w in work) < 15 * N                               # real savings
  plain = kmeans(x, K, init_centroids=c0, num_iters=15, prune=False)
  np.testing.assert_array_equal(pruned.assignments, plain.assignments)
  np.testing.assert_array_equal(pruned.centroids, plain.centroids)
  assert pruned.objective == plain.objective


def test_identical_results_on_1_and_8_devices(tmp_path):
  from conftest import run_with_devices
  code = """
    import json, numpy as np, jax
    from tests.test_kmeans import fmnist_features
    from deeper_jax.cluster.kmeans import kmeans
    x = fmnist_features(1001)  # not a multiple of 8: the last shard has padding rows
    out = {'devices': jax.device_count()}
    for init in ('random', 'kmeans++'):
      r = kmeans(x, 13, seed=5, init=init, chunk_size=48)
      np.save(f'OUT/{jax.device_count()}_{init}.npy', r.centroids)
      out[init] = {'assignments': r.assignments.tolist(), 'objective': r.objective,
                   'sizes': r.sizes.tolist()}
    print(json.dumps(out))
  """.replace("OUT", str(tmp_path))
  one, eight = run_with_devices(code, 1), run_with_devices(code, 8)
  assert (one["devices"], eight["devices"]) == (1, 8)
  for init in ("random", "kmeans++"):
    assert one[init]["assignments"] == eight[init]["assignments"]
    assert one[init]["sizes"] == eight[init]["sizes"]
    assert one[init]["objective"] == eight[init]["objective"]
    np.testing.assert_array_equal(np.load(tmp_path / f"1_{init}.npy"),
                                  np.load(tmp_path / f"8_{init}.npy"))


def test_jax_array_input_gives_the_numpy_result():
  import jax.numpy as jnp
  x = fmnist_features(N)
  a, b = kmeans(x, K, seed=4), kmeans(jnp.asarray(x), K, seed=4)
  np.testing.assert_array_equal(a.assignments, b.assignments)
  assert a.objective == b.objective


def test_progress_reports_every_iteration_and_objective_does_not_rise():
  x = fmnist_features(N)
  seen = []
  r = kmeans(x, K, num_iters=6, seed=0, progress=lambda i, obj: seen.append((i, obj)))
  assert [i for i, _ in seen] == list(range(6))
  objectives = [obj for _, obj in seen] + [r.objective]
  assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:]))


def test_duplicate_heavy_real_data_leaves_no_empty_cluster():
  images = fmnist_features(60)               # 60 distinct real images ...
  x = np.repeat(images, 50, axis=0)          # ... each 50 times: N = 3000
  np.random.default_rng(0).shuffle(x)
  for k, init in ((60, "random"), (58, "random"), (58, "kmeans++")):
    r = kmeans(x, k, seed=1, init=init)
    assert r.sizes.min() > 0, (k, init, np.sort(r.sizes)[:5])


def test_empty_clusters_from_repeated_init_centroids_are_split():
  x = fmnist_features(N)
  c0 = distinct_rows(x, K)
  c0[15:] = c0[0]  # eleven copies of one centroid: ten clusters start empty
  r = kmeans(x, K, init_centroids=c0, seed=0)
  assert r.sizes.min() > 0
  assert len({c.tobytes() for c in r.centroids}) == K


def test_split_copies_a_non_empty_centroid_plus_and_minus_eps():
  import jax
  centroids = np.array([[0.5, 1.0], [2.0, 3.0], [9.0, 9.0]], np.float32)
  counts = np.array([4, 0, 6], np.int32)
  out = np.asarray(split_empty_clusters(centroids, counts, jax.random.PRNGKey(0)))
  donor = 0 if np.array_equal(out[2], centroids[2]) else 2  # the one that was split
  assert counts[donor] > 0
  eps = np.maximum(np.float32(SPLIT_EPS), np.spacing(np.abs(centroids[donor])))
  np.testing.assert_array_equal(out[1], centroids[donor] + eps)
  np.testing.assert_array_equal(out[donor], centroids[donor] - eps)
  np.testing.assert_array_equal(out[2 - donor], centroids[2 - donor])


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, r"k must be an integer >= 1"),
    ({"k": 5001}, r"k=5001 is larger than the number of points N=200"),
    ({"k": 3, "init_centroids": np.zeros((3, 31), np.float32)},
     r"init_centroids has shape \(3, 31\) but must be \[k, d\] = \(3, 32\)"),
    ({"k": 3, "init_centroids": np.zeros((4, 32), np.float32)},
     r"init_centroids has shape \(4, 32\)"),
    ({"k": 3, "init": "furthest"}, r"init must be one of \('random', 'kmeans\+\+'\)"),
    ({"k": 3, "chunk_size": 0}, r"chunk_size must be an integer >= 1"),
    ({"k": 3, "num_iters": -1}, r"num_iters must be an integer >= 0"),
    ({"k": 3, "num_valid": 201}, r"num_valid must be an integer in \[1, 200\]"),
])
def test_invalid_arguments_raise_one_clear_error(kwargs, match):
  x = fmnist_features(200)
  with pytest.raises(ValueError, match=match):
    kmeans(x, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_rejected(bad):
  x = fmnist_features(200).copy()
  x[17, 3] = bad
  with pytest.raises(ValueError, match=r"x contains NaN or inf values"):
    kmeans(x, 5)


def test_features_must_be_a_matrix():
  with pytest.raises(ValueError, match=r"x must be a 2-D \[N, d\] array"):
    kmeans(np.zeros(10, np.float32), 2)


def test_rows_past_num_valid_are_padding_and_change_nothing():
  """Level 2 of hierarchical k-means pads subsets to bucketed sizes (one compilation)."""
  x = fmnist_features(N)
  padded = np.concatenate([x[:1500], np.full((500, x.shape[1]), 1e3, np.float32)])
  a = kmeans(x[:1500], K, seed=6)
  b = kmeans(padded, K, seed=6, num_valid=1500)
  assert b.assignments.shape == (1500,)
  np.testing.assert_array_equal(a.assignments, b.assignments)
  np.testing.assert_array_equal(a.sizes, b.sizes)
  # The fixed-point format is sized on every row, padding included, so the last bits of
  # the centroids may differ; the clustering may not.
  assert b.objective == pytest.approx(a.objective, rel=1e-6)
  np.testing.assert_allclose(b.centroids, a.centroids, atol=1e-5)
