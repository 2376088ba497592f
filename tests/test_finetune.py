"""Few-label fine-tuning (evaluate/finetune.py), and the probes of a backbone that has
really learned something: small_cnn28 trained with labels for 300 steps.

A network trained with labels is the one case where we know which way the comparisons
must come out (pretrained beats scratch; trained features beat random ones), so it
validates the probe and fine-tuning pipelines that read self-supervised networks.
"""
import jax
import numpy as np
import pytest

from conftest import test_config
from deeper_jax.evaluate import finetune, linear
from deeper_jax.extract.features import FEATURES, extract_features
from deeper_jax.models import build_backbone
from deeper_jax.train.state import init_variables
from eval_helpers import fashion_datasets, make_context


@pytest.fixture(scope="module")
def supervised(fmnist_train):
  """small_cnn28 (width 16) trained with labels for 300 steps, and its init."""
  config = test_config("tiny", **{"model.width": 16, "model.feature_dim": 128})
  module = build_backbone(config.model)
  untrained = init_variables(module, config, 1)
  trained, head = finetune.train_classifier(
      module, untrained, fmnist_train, np.arange(len(fmnist_train)), image_size=28,
      steps=300, batch_size=64, lr=0.1, seed=0)
  return module, untrained, trained, head


def test_class_balanced_subset():
  labels = np.repeat(np.arange(4), [50, 30, 100, 20])
  # 10% of 200 labels = 20 = 5 per class.
  idx = finetune.class_balanced_subset(labels, 0.1, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 5, 5, 5])
  assert len(np.unique(idx)) == idx.size
  np.testing.assert_array_equal(idx, finetune.class_balanced_subset(labels, 0.1, seed=3))
  assert not np.array_equal(idx, finetune.class_balanced_subset(labels, 0.1, seed=4))
  # A class smaller than its share (40) gives all it has.
  np.testing.assert_array_equal(
      np.bincount(labels[finetune.class_balanced_subset(labels, 0.8)]), [40, 30, 40, 20])
  with pytest.raises(ValueError, match="fraction"):
    finetune.class_balanced_subset(labels, 0.0)
  assert [finetune.fraction_key(f) for f in (0.01, 0.1, 0.005)] == ["1%", "10%", "0.5%"]


def test_supervised_training_is_real(fmnist_test, supervised):
  module, untrained, trained, head = supervised
  assert finetune.classifier_accuracy(module, trained, head, fmnist_test, image_size=28,
                                      indices=np.arange(2000)) > 0.75
  # The caller's variables are left alone (the step donates its own copies).
  assert not np.allclose(jax.tree.leaves(untrained["params"])[0],
                         jax.tree.leaves(trained["params"])[0])


def test_last_layer_probe_of_trained_backbone_beats_untrained(fmnist_train, fmnist_test,
                                                              supervised):
  module, untrained, trained, _ = supervised
  tr_idx, te_idx = np.arange(4000), np.arange(2000)
  accuracy = {}
  for name, variables in (("untrained", untrained), ("trained", trained)):
    ftr = extract_features(module, variables, fmnist_train, layers=["conv3"], indices=tr_idx)
    fte = extract_features(module, variables, fmnist_test, layers=["conv3"], indices=te_idx)
    probes = linear.linear_probe_by_layer(ftr, fmnist_train.labels[tr_idx], fte,
                                          fmnist_test.labels[te_idx],
                                          layers=["conv3", FEATURES], epochs=10, seed=0)
    accuracy[name] = {k: r.test_top1 for k, r in probes.items()}
  assert accuracy["trained"][FEATURES] > accuracy["untrained"][FEATURES] + 0.02
  assert accuracy["trained"]["conv3"] > accuracy["untrained"]["conv3"]
  assert accuracy["untrained"][FEATURES] > 0.5  # random conv features are not useless


def test_finetune_from_supervised_weights_beats_scratch_with_1_percent(
    fmnist_train, fmnist_test, supervised):
  module, _, trained, _ = supervised
  result = finetune.finetune_few_labels(module, trained, fmnist_train, fmnist_test,
                                        image_size=28, fractions=(0.01,), steps=60,
                                        batch_size=64, seed=0, test_indices=np.arange(2000))
  assert set(result) == {"1%"}
  assert set(result["1%"]) == {"pretrained", "scratch"}
  assert result["1%"]["pretrained"] > result["1%"]["scratch"] + 0.03
  assert result["1%"]["pretrained"] > 0.7
  assert result["1%"]["scratch"] > 0.3  # scratch learns too (chance is 0.1)


def test_finetune_evaluator_reports_each_fraction_for_both_starts(tmp_path):
  ctx = make_context(tmp_path, fashion_datasets(n_labelled=3000, n_test=500),
                     **{"eval.finetune_steps": 20, "eval.finetune_fractions": (0.01, 0.1)})
  result = finetune.evaluate(ctx)
  assert (result["steps"], result["test_images"]) == (20, 500)
  assert set(result["top1"]) == {"1%", "10%"}
  for fraction in result["top1"].values():
    assert set(fraction) == {"pretrained", "scratch"}
    # Both learn something in 20 steps (chance is 0.1); which one wins is the
    # supervised tests' business above.
    assert all(0.25 < v <= 1.0 for v in fraction.values()), result
