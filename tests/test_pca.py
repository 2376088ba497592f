"""PCA-whitening + L2 (deeper_jax.reduce.pca) on real Fashion-MNIST pixels."""
import functools

import numpy as np
import pytest

from deeper_jax.data import load_fashion_mnist
from deeper_jax.reduce.pca import (EIGENVALUE_FLOOR, apply_pca_whitening, fit_pca_whitening,
                                   sample_rows, whitened)


@functools.lru_cache(maxsize=None)
def pixels(n: int) -> np.ndarray:
  """The first n real Fashion-MNIST training images, float32 [n, 784] in [0, 1]."""
  images = load_fashion_mnist("train").images(np.arange(n))
  return images.reshape(n, -1).astype(np.float32) / 255.0


def features(n: int = 1500, d: int = 64) -> np.ndarray:
  """Real images downsampled to 8x8 = 64 dims (a full-rank, strongly correlated input)."""
  return pixels(n).reshape(n, 28, 28)[:, 2:26, 2:26].reshape(n, 8, 3, 8, 3).mean((2, 4)).reshape(
      n, -1)[:, :d].copy()


def test_whitened_sample_has_identity_covariance():
  x = features()
  pca = fit_pca_whitening(x, 32, sample_size=1000, seed=3)
  sample = x[sample_rows(len(x), 1000, seed=3)]
  w = whitened(pca, sample)
  np.testing.assert_allclose(w.mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.cov(w.T), np.eye(32), atol=2e-3)


def test_output_rows_are_unit_norm_and_match_a_numpy_reference():
  x = features()
  pca = fit_pca_whitening(x, 16)
  y = apply_pca_whitening(pca, x)
  assert y.shape == (len(x), 16) and y.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
  # Reference: eigh of np.cov in float64, same sign convention.
  values, vectors = np.linalg.eigh(np.cov(x.astype(np.float64).T))
  values, vectors = values[::-1][:16], vectors[:, ::-1][:, :16]
  vectors *= np.sign(vectors[np.abs(vectors).argmax(0), np.arange(16)])
  ref = (x - x.mean(0)) @ (vectors / np.sqrt(values))
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(y, ref, atol=2e-3)


def test_top_directions_are_kept_in_order():
  x = features()
  full = whitened(fit_pca_whitening(x, 32), x)
  top = whitened(fit_pca_whitening(x, 8), x)
  np.testing.assert_allclose(top, full[:, :8], atol=1e-4)


def test_eigenvalues_are_floored_so_null_directions_stay_finite():
  x = features()
  x = np.concatenate([x, x[:, :4] * 2.0], axis=1)  # 4 exactly dependent columns: rank 64 of 68
  pca = fit_pca_whitening(x, 68)
  assert np.isfinite(pca.projection).all()
  variance = np.var(whitened(pca, x), axis=0, ddof=1)
  np.testing.assert_allclose(variance[:60], 1.0, atol=1e-2)
  # Null directions: eigenvalue ~0 floored to 1e-5 * max, so their variance is ~0, not 1.
  assert variance[-4:].max() < 1e-2
  largest = np.linalg.eigvalsh(np.cov(x.T)).max()
  assert np.abs(pca.projection[:, -1]).max() <= 1.01 / np.sqrt(EIGENVALUE_FLOOR * largest)


def test_chunked_application_matches_one_chunk():
  x = features()
  pca = fit_pca_whitening(x, 16)
  np.testing.assert_allclose(apply_pca_whitening(pca, x, chunk_size=97),
                             apply_pca_whitening(pca, x, chunk_size=len(x)), atol=1e-6)


def test_refit_on_same_data_is_identical():
  x = features()
  a = fit_pca_whitening(x, 16, sample_size=800, seed=1)
  b = fit_pca_whitening(x, 16, sample_size=800, seed=1)
  np.testing.assert_array_equal(a.projection, b.projection)
  np.testing.assert_array_equal(a.mean, b.mean)


def test_eight_devices_fit_the_same_whitening():
  from conftest import run_with_devices
  code = """
    import json, numpy as np
    from tests.test_pca import features
    from deeper_jax.reduce.pca import fit_pca_whitening, apply_pca_whitening
    x = features(1001)
    pca = fit_pca_whitening(x, 16, sample_size=777, seed=2)
    print(json.dumps(apply_pca_whitening(pca, x, chunk_size=50).tolist()))
  """
  one, eight = run_with_devices(code, 1), run_with_devices(code, 8)
  # Float psums add in a different order on 8 shards (unlike k-means' exact integer
  # sums), and whitening amplifies the last bits of small-eigenvalue directions.
  np.testing.assert_allclose(np.array(one), np.array(eight), atol=1e-4)


def test_invalid_inputs_raise_clear_errors():
  x = features()
  with pytest.raises(ValueError, match=r"dim must be an integer in \[1, d=64\], got 65"):
    fit_pca_whitening(x, 65)
  with pytest.raises(ValueError, match=r"PCA needs at least 2 rows"):
    fit_pca_whitening(x, 8, sample_size=1)
  pca = fit_pca_whitening(x, 8)
  with pytest.raises(ValueError, match=r"x has d=63 columns but the PCA was fitted on 64"):
    apply_pca_whitening(pca, x[:, :63])
  bad = x.copy()
  bad[3, 3] = np.nan
  with pytest.raises(ValueError, match=r"x contains NaN or inf values"):
    fit_pca_whitening(bad, 8)
  with pytest.raises(ValueError, match=r"x contains NaN or inf values"):
    apply_pca_whitening(pca, bad)
  with pytest.raises(ValueError, match=r"zero variance"):
    fit_pca_whitening(np.ones((10, 4), np.float32), 2)


def test_fit_on_a_sample_is_the_fit_on_those_rows():
  x = features()
  rows = sample_rows(len(x), 700, seed=4)
  assert len(np.unique(rows)) == 700 and np.all(np.diff(rows) > 0)
  sampled = fit_pca_whitening(x, 16, sample_size=700, seed=4)
  direct = fit_pca_whitening(x[rows], 16)
  np.testing.assert_allclose(sampled.mean, direct.mean, atol=1e-6)
  np.testing.assert_allclose(sampled.projection, direct.projection, rtol=1e-4, atol=1e-4)
  other = fit_pca_whitening(x, 16, sample_size=700, seed=5)
  assert not np.allclose(other.mean, sampled.mean)
