"""``run_evaluation`` end to end on a small real Fashion-MNIST configuration."""
import json
import os
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from deeper_jax.data.fashion_mnist import load_fashion_mnist
from deeper_jax.evaluate import DEFAULTS, run_evaluation
from deeper_jax.evaluate.suite import read_eval_config, sample_indices
from deeper_jax.models import build_backbone

SMALL = ml_collections.ConfigDict({
    "probe_max_train_images": 2000,
    "probe_max_test_images": 1000,
    "probe_epochs": 3,
    "finetune_fractions": (0.01, 0.1),
    "finetune_steps": 20,
    "finetune_max_test_images": 500,
    "grid_per_cluster": 9,
})


@pytest.fixture(scope="module")
def setup():
  train = load_fashion_mnist("train")
  test = load_fashion_mnist("test")
  datasets = SimpleNamespace(train=train.subset(np.arange(3000)),
                             labelled_train=train.subset(np.arange(3000, 13000)),
                             test=test)
  module = build_backbone({"name": "small_cnn28", "width": 8, "feature_dim": 64})
  variables = jax.jit(lambda key: module.init(
      key, np.zeros((1, 28, 28, 1), np.float32)))(jax.random.key(0))
  return module, variables, datasets


def png_shows_data(path):
  image = np.asarray(Image.open(path).convert("RGB"), np.float32)
  return image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 20


def test_run_evaluation_writes_every_result(setup, tmp_path):
  module, variables, datasets = setup
  labels = datasets.train.labels
  # Each class split in two clusters: purity 1, NMI below 1.
  clusters = 2 * labels + (np.arange(len(labels)) % 2)
  results = run_evaluation(module, variables, datasets, SMALL, workdir=str(tmp_path),
                           cluster_labels=clusters, seed=0)
  with open(tmp_path / "eval" / "results.json") as f:
    written = json.load(f)
  for key in ("linear_probe_by_layer", "knn_top1", "nmi", "ari", "purity", "finetune"):
    assert written[key] == results[key], key
  probes = written["linear_probe_by_layer"]
  assert list(probes) == ["conv1", "conv2", "conv3", "features"]
  assert all(0.5 < v <= 1.0 for v in probes.values())  # 10 classes: chance is 0.1
  assert 0.6 < written["knn_top1"] <= 1.0
  assert written["purity"] == 1.0
  assert 0.5 < written["nmi"] < 1.0 and 0.0 < written["ari"] < 1.0
  assert set(written["finetune"]) == {"1%", "10%"}
  for fraction in written["finetune"].values():
    assert set(fraction) == {"pretrained", "scratch"}
    # Both learn something in 20 steps (chance is 0.1); which one wins is
    # tested in test_evaluate_probe.py with a backbone trained with labels.
    assert all(0.25 < v <= 1.0 for v in fraction.values())
  assert written["details"]["probe_train_images"] == 2000
  assert written["details"]["probe_test_images"] == 1000
  assert written["timings"]["total"] > 0
  for png in ("probe_by_layer.png", "clusters.png"):
    assert png_shows_data(tmp_path / "eval" / png), png


def test_run_evaluation_is_reproducible_and_skips_what_it_cannot_do(setup, tmp_path):
  module, variables, datasets = setup
  config = dict(SMALL, probe_layers=["conv3"], finetune_steps=0)
  a = run_evaluation(module, variables, datasets, config, workdir=str(tmp_path / "a"))
  b = run_evaluation(module, variables, datasets, config, workdir=str(tmp_path / "b"))
  assert list(a["linear_probe_by_layer"]) == ["conv3"]
  assert a["linear_probe_by_layer"] == b["linear_probe_by_layer"]
  assert a["knn_top1"] == b["knn_top1"]
  # No cluster labels: no cluster metrics, no picture; finetune_steps=0: no fine-tuning.
  assert a["nmi"] is None and a["ari"] is None and a["purity"] is None
  assert a["finetune"] is None
  assert not os.path.exists(tmp_path / "a" / "eval" / "clusters.png")
  # Unlabelled pre-training data (uncurated): clusters are drawn, metrics are None.
  unlabelled = SimpleNamespace(train=_Unlabelled(datasets.train), labelled_train=None,
                               test=None)
  c = run_evaluation(module, variables, unlabelled, config, workdir=str(tmp_path / "c"),
                     cluster_labels=datasets.train.labels)
  assert c["nmi"] is None and c["linear_probe_by_layer"] is None
  assert png_shows_data(tmp_path / "c" / "eval" / "clusters.png")


class _Unlabelled:
  """A source without labels, as an uncurated image folder would be."""

  def __init__(self, base):
    self.base = base
    self.labels = None
    self.num_classes = None
    self.image_shape = base.image_shape

  def __len__(self):
    return len(self.base)

  def images(self, indices):
    return self.base.images(indices)


def test_run_evaluation_rejects_wrong_cluster_label_count(setup, tmp_path):
  module, variables, datasets = setup
  config = dict(SMALL, probe_epochs=0, knn=False, finetune_steps=0)
  with pytest.raises(ValueError, match="cluster_labels"):
    run_evaluation(module, variables, datasets, config, workdir=str(tmp_path),
                   cluster_labels=np.zeros(10, int))


def test_eval_config_defaults_and_sampling():
  cfg = read_eval_config(ml_collections.ConfigDict({"knn_k": 5, "probe_lr": None}))
  assert cfg["knn_k"] == 5 and cfg["probe_lr"] == DEFAULTS["probe_lr"]
  assert read_eval_config(None) == DEFAULTS
  np.testing.assert_array_equal(sample_indices(5, 0, seed=0), np.arange(5))
  idx = sample_indices(100, 10, seed=0)
  assert idx.size == 10 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(idx, sample_indices(100, 10, seed=0))
