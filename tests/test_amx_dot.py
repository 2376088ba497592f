"""The AMX score kernel (deeper_jax.clustering.amx_dot): accuracy, determinism, fallback.

Kernel tests skip (saying why) on machines without AMX or g++; the fallback and
argument tests run everywhere.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deeper_jax.clustering import amx_dot  # noqa: E402
from test_kmeans import fmnist_features  # noqa: E402


@pytest.fixture
def kernel():
  why = amx_dot.unavailable_reason()
  if why:
    pytest.skip(f"AMX kernel unavailable: {why}")
  return jax.jit(amx_dot.scores)


def reference(x, c, bias):
  return np.asarray(x, np.float64) @ np.asarray(c, np.float64).T + np.asarray(bias, np.float64)


# Rows and columns not multiples of the 32 x 32 tiles, depths not multiples of 32;
# 2100 rows = 66 panels in work items of 4 panels and a last item of 2.
@pytest.mark.parametrize("rows, n, d", [(2048, 1024, 256), (77, 50, 70), (33, 17, 32),
                                        (1, 1, 5), (300, 1000, 128), (2100, 70, 96)])
def test_scores_are_within_the_stated_bound_on_real_features(kernel, rows, n, d):
  x = fmnist_features(rows + n, d)
  c, x = -2.0 * x[rows:], x[:rows]      # centroids are passed as -2c, like lloyd.py
  bias = np.sum(c * c, axis=1) / 4      # ||c||^2
  got = np.asarray(kernel(x, c, bias))
  assert got.shape == (rows, n) and got.dtype == np.float32
  scale = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(c, axis=1)[None, :]
  err = np.abs(got - reference(x, c, bias))
  bound = amx_dot.relative_error("bf16x3", d) * scale + 2.0**-23 * np.abs(got)
  assert np.all(err <= bound)
  # Far better than plain bf16 (2^-8): the hi/lo split does its job.
  assert np.max(err / scale) < 2.0**-14


def test_padding_slots_with_infinite_bias_score_infinity(kernel):
  x = fmnist_features(40, 64)
  c = np.concatenate([x[:5], np.zeros((3, 64), np.float32)])
  bias = np.array([0.0] * 5 + [np.inf] * 3, np.float32)
  got = np.asarray(kernel(x, c, bias))
  assert np.all(np.isinf(got[:, 5:])) and np.all(np.isfinite(got[:, :5]))


def test_a_pair_scores_the_same_bits_in_any_block(kernel):
  """lloyd.py compares scores from full and compacted centroid tiles bit for bit."""
  x = fmnist_features(600, 96)
  xs, c = x[:500], x[500:]
  bias = np.zeros(len(c), np.float32)
  full = np.asarray(kernel(xs, c, bias))
  rows, cols = np.array([3, 4, 250, 499, 17]), np.array([99, 0, 31, 32, 64, 5])
  part = np.asarray(kernel(xs[rows], c[cols], bias[cols]))
  np.testing.assert_array_equal(part, full[np.ix_(rows, cols)])
  np.testing.assert_array_equal(np.asarray(kernel(xs, c, bias)), full)  # and run to run


def test_kernel_runs_inside_jit_with_other_ops(kernel):
  x, c = fmnist_features(100, 32)[:64], fmnist_features(100, 32)[64:]

  @jax.jit
  def nearest(x, c):
    return jnp.argmin(amx_dot.scores(x, -2.0 * c, jnp.sum(c * c, axis=1)), axis=1)

  ref = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
  assert np.mean(np.asarray(nearest(x, c)) == ref) > 0.99


def test_auto_falls_back_to_float32_and_explicit_bf16x3_explains(monkeypatch):
  monkeypatch.setattr(amx_dot, "unavailable_reason", lambda: "this CPU lacks amx_tile")
  cpus = jax.devices("cpu")
  assert amx_dot.resolve("auto", cpus) == "float32"
  assert amx_dot.resolve("float32", cpus) == "float32"
  with pytest.raises(ValueError, match=r"dot='bf16x3' is not available: this CPU lacks "
                                       r"amx_tile; use dot='auto' or 'float32'"):
    amx_dot.resolve("bf16x3", cpus)
  with pytest.raises(ValueError, match=r"dot must be one of"):
    amx_dot.resolve("tf32", cpus)


def test_non_cpu_devices_use_xla_dot(monkeypatch):
  class Gpu:
    platform = "gpu"
  monkeypatch.setattr(amx_dot, "unavailable_reason", lambda: None)
  assert amx_dot.resolve("auto", [Gpu()]) == "float32"
  with pytest.raises(ValueError, match="not CPUs"):
    amx_dot.resolve("bf16x3", [Gpu()])


def test_error_bounds_grow_with_depth_and_bf16x3_is_looser():
  for d in (32, 256, 4096):
    assert amx_dot.relative_error("float32", d) < amx_dot.relative_error("bf16x3", d)
  assert amx_dot.relative_error("bf16x3", 256) < amx_dot.relative_error("bf16x3", 4096)
  with pytest.raises(ValueError, match="'float32' or 'bf16x3'"):
    amx_dot.relative_error("auto", 8)
