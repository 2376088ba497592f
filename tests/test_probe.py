"""The fast linear probe: its classifier (evaluate/linear.py) and the ``probe`` evaluator.

The fast protocol is a quick check of feature quality, not the paper's numbers
(test_probe_paper.py): stage outputs after their max-pool, adaptively pooled,
standardised, a logistic regression without augmentation.
"""
import json

import numpy as np
import pytest

from deeper_jax.evaluate import context as context_lib
from deeper_jax.evaluate import linear, probe
from eval_helpers import fashion_datasets, make_context, pixels, png_shows_data




# --- the classifier ---------------------------------------------------------------


def test_probe_on_raw_pixels_beats_chance_and_shuffled_labels_do_not(fmnist_train, fmnist_test):
  xtr, ytr = pixels(fmnist_train, 5000), fmnist_train.labels[:5000]
  xte, yte = pixels(fmnist_test, 2000), fmnist_test.labels[:2000]
  result = linear.train_linear_probe(xtr, ytr, xte, yte, epochs=10, seed=0)
  # About 84% with all 60k images and a converged solver.
  assert result.test_top1 > 0.75
  assert result.train_top1 >= result.test_top1 - 0.02
  assert result.dim == 784
  shuffled = np.random.default_rng(0).permutation(ytr)
  control = linear.train_linear_probe(xtr, shuffled, xte, yte, epochs=10, seed=0)
  assert control.test_top1 < 0.15


def test_probe_is_deterministic_for_a_seed(fmnist_train, fmnist_test):
  xtr, ytr = pixels(fmnist_train, 2000), fmnist_train.labels[:2000]
  xte, yte = pixels(fmnist_test, 1000), fmnist_test.labels[:1000]
  a = linear.train_linear_probe(xtr, ytr, xte, yte, epochs=3, seed=7)
  b = linear.train_linear_probe(xtr, ytr, xte, yte, epochs=3, seed=7)
  assert (a.test_top1, a.train_top1, a.final_loss) == (b.test_top1, b.train_top1, b.final_loss)


def test_probe_rejects_mismatched_inputs():
  x = np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="labels"):
    linear.train_linear_probe(x, np.zeros(9), x, np.zeros(10))
  with pytest.raises(ValueError, match="dims"):
    linear.train_linear_probe(x, np.zeros(10), x[:, :3], np.zeros(10))
  with pytest.raises(ValueError, match="missing"):
    linear.linear_probe_by_layer({"a": x}, np.zeros(10), {"a": x}, np.zeros(10), layers=["b"])


def test_probe_plot_png_shows_data(tmp_path):
  path = tmp_path / "probe.png"
  linear.plot_probe_by_layer({"conv1": 0.61, "conv2": 0.72, "conv3": 0.78, "features": 0.7},
                             str(path), chance=0.1)
  assert png_shows_data(path)
  with pytest.raises(ValueError, match="empty"):
    linear.plot_probe_by_layer({}, str(path))


def test_sample_indices_are_all_or_a_sorted_seeded_subset():
  np.testing.assert_array_equal(context_lib.sample_indices(5, 0, seed=0), np.arange(5))
  np.testing.assert_array_equal(context_lib.sample_indices(5, 9, seed=0), np.arange(5))
  idx = context_lib.sample_indices(100, 10, seed=0)
  assert idx.size == 10 and np.all(np.diff(idx) > 0) and idx.max() < 100
  np.testing.assert_array_equal(idx, context_lib.sample_indices(100, 10, seed=0))
  assert not np.array_equal(idx, context_lib.sample_indices(100, 10, seed=1))


# --- the evaluator -------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets():
  return fashion_datasets()


def test_fast_probe_reads_every_block_and_heads_the_last(datasets, tmp_path):
  # The evaluated network *is* the config seed's random init here, so its probes and
  # the "random init" baseline's must agree exactly.
  ctx = make_context(tmp_path, datasets, **{"eval.probe_max_train_images": 1000,
                                           "eval.probe_max_test_images": 500,
                                           "eval.probe_epochs": 3})
  result = probe.evaluate(ctx)
  assert result["protocol"] == "fast"
  assert list(result["by_layer"]) == ["conv1", "conv2", "conv3", "features"]
  assert result["layer"] == "conv3"  # the last conv block (paper Table 3)
  assert result["top1"] == result["by_layer"]["conv3"]
  # Random convolutions already separate Fashion-MNIST classes (chance: 0.1).
  assert all(0.5 < top1 <= 1.0 for top1 in result["by_layer"].values()), result["by_layer"]
  # Adaptive pooling leaves these small blocks whole: 14x14x8, 7x7x16, 3x3x32.
  assert result["dims"] == {"conv1": 1568, "conv2": 784, "conv3": 288, "features": 64}
  assert (result["train_images"], result["test_images"]) == (1000, 500)
  assert result["random_init_by_layer"] == result["by_layer"]
  assert result["random_init_top1"] == result["top1"]
  json.dumps(result)  # a results.json section
  assert png_shows_data(tmp_path / "eval" / "probe_by_layer.png")


def test_fast_probe_of_chosen_layers_without_the_random_init_baseline(datasets, tmp_path):
  ctx = make_context(tmp_path, datasets, variables_seed=1,
                     **{"eval.probe_layers": "conv2", "eval.probe_random_init": False,
                        "eval.probe_max_train_images": 500,
                        "eval.probe_max_test_images": 500, "eval.probe_epochs": 2})
  result = probe.evaluate(ctx)
  assert list(result["by_layer"]) == ["conv2"]
  assert result["layer"] == "conv2" and result["top1"] > 0.4
  assert "random_init_by_layer" not in result and "random_init_top1" not in result
