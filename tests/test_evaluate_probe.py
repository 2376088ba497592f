"""Feature extraction, linear probes and few-label fine-tuning on real Fashion-MNIST."""
import jax
import numpy as np
import pytest

from deeper_jax.data.fashion_mnist import load_fashion_mnist
from deeper_jax.evaluate.features import FEATURES, block_shapes, extract_features
from deeper_jax.evaluate.finetune import (class_balanced_subset, classifier_accuracy,
                                          finetune_few_labels, train_classifier)
from deeper_jax.evaluate.linear_probe import linear_probe_by_layer, train_linear_probe
from deeper_jax.models import build_backbone


@pytest.fixture(scope="module")
def fmnist():
  return load_fashion_mnist("train"), load_fashion_mnist("test")


def pixels(source, n):
  return source.images(np.arange(n)).reshape(n, -1).astype(np.float32) / 255.0


def small_cnn(width=16, feature_dim=128):
  module = build_backbone({"name": "small_cnn28", "width": width,
                           "feature_dim": feature_dim})
  init = jax.jit(lambda key: module.init(key, np.zeros((1, 28, 28, 1), np.float32),
                                         train=False))
  return module, init(jax.random.key(0))


# --- linear probe -------------------------------------------------------------------


def test_probe_on_raw_pixels_beats_chance_and_shuffled_labels_do_not(fmnist):
  train, test = fmnist
  xtr, ytr = pixels(train, 5000), train.labels[:5000]
  xte, yte = pixels(test, 2000), test.labels[:2000]
  result = train_linear_probe(xtr, ytr, xte, yte, epochs=10, seed=0)
  # DESIGN §6: 84.4% with all 60k images and a converged solver.
  assert result.test_top1 > 0.75
  assert result.train_top1 >= result.test_top1 - 0.02
  assert result.dim == 784
  shuffled = np.random.default_rng(0).permutation(ytr)
  control = train_linear_probe(xtr, shuffled, xte, yte, epochs=10, seed=0)
  assert control.test_top1 < 0.15


def test_probe_is_deterministic_for_a_seed(fmnist):
  train, test = fmnist
  xtr, ytr = pixels(train, 2000), train.labels[:2000]
  xte, yte = pixels(test, 1000), test.labels[:1000]
  a = train_linear_probe(xtr, ytr, xte, yte, epochs=3, seed=7)
  b = train_linear_probe(xtr, ytr, xte, yte, epochs=3, seed=7)
  assert (a.test_top1, a.train_top1, a.final_loss) == (b.test_top1, b.train_top1,
                                                        b.final_loss)


def test_probe_rejects_mismatched_inputs():
  x = np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="labels"):
    train_linear_probe(x, np.zeros(9), x, np.zeros(10))
  with pytest.raises(ValueError, match="dims"):
    train_linear_probe(x, np.zeros(10), x[:, :3], np.zeros(10))


# --- feature extraction ------------------------------------------------------------


def test_extract_features_shapes_padding_and_eval_mode(fmnist):
  train, _ = fmnist
  module, variables = small_cnn()
  shapes = block_shapes(module, variables, (28, 28, 1))
  assert shapes == {"conv1": (14, 14, 16), "conv2": (7, 7, 32), "conv3": (3, 3, 64)}
  idx = np.arange(37, 37 + 70)
  # 70 images in batches of 32: the last batch is padded, the padding dropped.
  a = extract_features(module, variables, train, batch_size=32, layers="all",
                       indices=idx)
  assert {k: v.shape for k, v in a.items()} == {
      FEATURES: (70, 128), "conv1": (70, 3136), "conv2": (70, 1568),
      "conv3": (70, 576)}
  # Same rows whatever the batching (eval mode: dropout off, BN running stats).
  b = extract_features(module, variables, train, batch_size=512, layers=["conv2"],
                       indices=idx)
  assert set(b) == {FEATURES, "conv2"}
  np.testing.assert_allclose(a[FEATURES], b[FEATURES], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a["conv2"], b["conv2"], rtol=1e-5, atol=1e-5)
  # Block 'conv3' is the stage output the backbone returns, flattened (no pooling).
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  _, blocks = apply(variables, train.images(idx[:3]).astype(np.float32) / 255)
  np.testing.assert_allclose(a["conv3"][:3], np.asarray(blocks["conv3"]).reshape(3, -1),
                             rtol=1e-5, atol=1e-5)
  assert extract_features(module, variables, train, indices=idx).keys() == {FEATURES}
  with pytest.raises(ValueError, match="conv9"):
    extract_features(module, variables, train, layers=["conv9"], indices=idx)


def test_extract_features_on_8_devices_matches_one_device(with_devices):
  out = with_devices("""
    import json, jax, numpy as np
    from deeper_jax import parallel
    from deeper_jax.data.fashion_mnist import load_fashion_mnist
    from deeper_jax.evaluate.features import extract_features
    from deeper_jax.models import build_backbone
    train = load_fashion_mnist('test')
    module = build_backbone({'name': 'small_cnn28', 'width': 8, 'feature_dim': 32})
    variables = module.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    idx = np.arange(100)
    one = extract_features(module, variables, train, batch_size=20, layers='all',
                           indices=idx)
    many = extract_features(module, variables, train, batch_size=20, layers='all',
                            indices=idx, mesh=parallel.make_mesh())
    print(json.dumps({'devices': jax.device_count(),
                      'keys': sorted(many),
                      'err': max(float(np.abs(one[k] - many[k]).max()) for k in one)}))
  """)
  assert out["devices"] == 8
  assert out["keys"] == ["conv1", "conv2", "conv3", "features"]
  assert out["err"] < 1e-4


# --- a backbone trained with labels (validates the probe pipeline) ---------------------


@pytest.fixture(scope="module")
def supervised(fmnist):
  """small_cnn28 (width 16) trained with labels for 300 steps, and its init."""
  train, _ = fmnist
  module, untrained = small_cnn(width=16, feature_dim=128)
  trained, head = train_classifier(module, untrained, train, np.arange(len(train)),
                                   steps=300, batch_size=64, lr=0.1, seed=0)
  return module, untrained, trained, head


def test_supervised_training_is_real(fmnist, supervised):
  _, test = fmnist
  module, untrained, trained, head = supervised
  assert classifier_accuracy(module, trained, head, test,
                             indices=np.arange(2000)) > 0.75
  # The caller's variables are left alone (the step donates its own copies).
  assert not np.allclose(
      jax.tree.leaves(untrained["params"])[0], jax.tree.leaves(trained["params"])[0])


def test_last_layer_probe_of_trained_backbone_beats_untrained(fmnist, supervised):
  train, test = fmnist
  module, untrained, trained, _ = supervised
  tr_idx, te_idx = np.arange(4000), np.arange(2000)
  accuracy = {}
  for name, variables in (("untrained", untrained), ("trained", trained)):
    ftr = extract_features(module, variables, train, layers=["conv3"], indices=tr_idx)
    fte = extract_features(module, variables, test, layers=["conv3"], indices=te_idx)
    probes = linear_probe_by_layer(ftr, train.labels[tr_idx], fte, test.labels[te_idx],
                                   layers=["conv3", FEATURES], epochs=10, seed=0)
    accuracy[name] = {k: r.test_top1 for k, r in probes.items()}
  assert accuracy["trained"][FEATURES] > accuracy["untrained"][FEATURES] + 0.02
  assert accuracy["trained"]["conv3"] > accuracy["untrained"]["conv3"]
  assert accuracy["untrained"][FEATURES] > 0.5  # random conv features are not useless


# --- few-label fine-tuning -----------------------------------------------------------


def test_class_balanced_subset():
  labels = np.repeat(np.arange(4), [50, 30, 100, 20])
  # 10% of 200 labels = 20 = 5 per class.
  idx = class_balanced_subset(labels, 0.1, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 5, 5, 5])
  assert len(np.unique(idx)) == idx.size
  np.testing.assert_array_equal(idx, class_balanced_subset(labels, 0.1, seed=3))
  assert not np.array_equal(idx, class_balanced_subset(labels, 0.1, seed=4))
  # A class smaller than its share (40) gives all it has.
  np.testing.assert_array_equal(
      np.bincount(labels[class_balanced_subset(labels, 0.8)]), [40, 30, 40, 20])
  with pytest.raises(ValueError, match="fraction"):
    class_balanced_subset(labels, 0.0)


def test_finetune_from_supervised_weights_beats_scratch_with_1_percent(fmnist, supervised):
  train, test = fmnist
  module, _, trained, _ = supervised
  result = finetune_few_labels(module, trained, train, test, fractions=(0.01,),
                               steps=60, batch_size=64, seed=0,
                               test_indices=np.arange(2000))
  assert set(result) == {"1%"}
  assert set(result["1%"]) == {"pretrained", "scratch"}
  assert result["1%"]["pretrained"] > result["1%"]["scratch"] + 0.03
  assert result["1%"]["pretrained"] > 0.7
  assert result["1%"]["scratch"] > 0.3  # scratch learns too (chance is 0.1)


