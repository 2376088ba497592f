"""Frozen features: which tensors each probe reads, and how they are pooled.

The fast probe reads each stage's output after its max-pool, adaptively pooled below
10k values; the paper's probes read every conv-BN-ReLU output *before* pooling, with
the reference eval_linear.py's fixed AvgPool2d windows (deeper_jax/extract/).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_sample_images

from conftest import fashion_mnist_images, test_config
from deeper_jax.extract import features as features_lib
from deeper_jax.extract import pooling
from deeper_jax.models import build_backbone
from deeper_jax.models.sobel import sobel

FEATURES = features_lib.FEATURES


def model_config(name, width, feature_dim, *, sobel_on=True, channels=1):
  config = test_config("tiny", **{"model.name": name, "model.width": width,
                                  "model.feature_dim": feature_dim, "model.sobel": sobel_on})
  config.model.mean = (0.3,) * channels
  config.model.std = (0.35,) * channels
  return config


def random_variables(model, image_size, channels=1, seed=0):
  """Variables of the network's structure with every value random, BN included.

  Random conv biases, BN affine and BN running statistics (not the init's 0 / 1), so a
  manual forward pass that got any of them wrong would disagree; built from shapes
  alone (``jax.eval_shape``), so no init is compiled.
  """
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name, shape = path[-1].key, leaf.shape
    noise = rng.normal(size=shape).astype(np.float32)
    if name == "kernel":  # He scale keeps the activations of every depth alive
      return noise * np.float32(np.sqrt(2.0 / math.prod(shape[:-1])))
    if name == "scale":
      return 1.0 + 0.2 * noise
    if name == "var":
      return 0.5 + np.abs(noise)
    return 0.2 * noise  # conv / BN / dense biases, running means
  return jax.tree_util.tree_map_with_path(value, dict(shapes))


def random_network(name, width, feature_dim, image_size, channels=1, sobel_on=True, seed=0):
  model = build_backbone(model_config(name, width, feature_dim, sobel_on=sobel_on,
                                      channels=channels).model)
  return model, random_variables(model, image_size, channels, seed)


# --- the fast probe's rule: adaptive pooling below max_dim ---------------------------

# VGG-16 blocks (after each max-pool) at 224 px -> pooled shape; the last one is
# the paper's "8192 dimensions" of Table 3.
VGG16_BLOCKS_224 = {
    "conv1": ((112, 112, 64), (12, 12, 64), 9216),
    "conv2": ((56, 56, 128), (8, 8, 128), 8192),
    "conv3": ((28, 28, 256), (6, 6, 256), 9216),
    "conv4": ((14, 14, 512), (4, 4, 512), 8192),
    "conv5": ((7, 7, 512), (4, 4, 512), 8192),
}


@pytest.mark.parametrize("block", sorted(VGG16_BLOCKS_224))
def test_pool_to_dim_gives_the_promised_vgg16_dims(block):
  shape, pooled, dim = VGG16_BLOCKS_224[block]
  assert pooling.pool_to_dim(shape) == pooled
  assert math.prod(pooled) == dim < 10_000
  # The largest such side: one more cell per side would reach 10k.
  side = pooled[0] + 1
  assert side * side * shape[2] >= 10_000


def test_pool_to_dim_leaves_small_blocks_and_global_pools_wide_ones():
  assert pooling.pool_to_dim((14, 14, 32)) == (14, 14, 32)  # 6272: already below
  assert pooling.pool_to_dim((3, 3, 128)) == (3, 3, 128)
  assert pooling.pool_to_dim((1, 1, 20000)) == (1, 1, 20000)  # cannot go below: 1x1
  assert pooling.pool_to_dim((4, 4, 20000)) == (1, 1, 20000)
  assert pooling.pool_to_dim((10, 20, 64), max_dim=2000) == (5, 5, 64)  # 5*5*64=1600
  assert pooling.pool_to_dim((2, 40, 100), max_dim=1000) == (2, 4, 100)
  with pytest.raises(ValueError, match="shape_hwc"):
    pooling.pool_to_dim((7, 7))


def test_adaptive_pool_averages_the_pytorch_bins():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
  out = np.asarray(pooling.adaptive_avg_pool(jnp.asarray(x), (4, 4)))
  # Bins of 7 -> 4: [0,2), [1,4), [3,6), [5,7).
  bins = [(0, 2), (1, 4), (3, 6), (5, 7)]
  for i, (a, b) in enumerate(bins):
    for j, (c, d) in enumerate(bins):
      np.testing.assert_allclose(out[:, i, j], x[:, a:b, c:d].mean(axis=(1, 2)),
                                 rtol=1e-5, atol=1e-6)
  # Divisible sizes: plain non-overlapping 2x2 mean pooling.
  y = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  expected = y.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(pooling.adaptive_avg_pool(jnp.asarray(y), (2, 2))),
                             expected, rtol=1e-5, atol=1e-6)


def test_pool_features_flattens_below_max_dim():
  x = jnp.ones((3, 14, 14, 512))
  out = pooling.pool_features(x)
  assert out.shape == (3, 8192)
  np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)


# --- the paper's rule: eval_linear.py's fixed windows ---------------------------------

# VGG-16's 13 conv layers at 224 px: (reference AvgPool2d window, pooled dims).
PAPER_VGG16_224 = {
    "conv1_1": (18, 9216), "conv1_2": (18, 9216),
    "conv2_1": (14, 8192), "conv2_2": (14, 8192),
    "conv3_1": (9, 9216), "conv3_2": (9, 9216), "conv3_3": (9, 9216),
    "conv4_1": (6, 8192), "conv4_2": (6, 8192), "conv4_3": (6, 8192),
    "conv5_1": (3, 8192), "conv5_2": (3, 8192), "conv5_3": (3, 8192),
}


@pytest.fixture(scope="module")
def vgg16_224_shapes():
  """layer_shapes of the full VGG-16-BN at 224 px, from shapes alone (nothing runs)."""
  config = model_config("vgg16_bn", 0, 0, channels=3)
  model = build_backbone(config.model)
  dummy = jnp.zeros((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
  return features_lib.layer_shapes(model, variables, 224, 3)


def test_vgg16_at_224_has_the_reference_layers(vgg16_224_shapes):
  feature_dim, blocks, convs = vgg16_224_shapes
  assert feature_dim == 4096
  assert list(convs) == list(PAPER_VGG16_224)
  assert convs["conv1_1"] == (224, 224, 64)
  assert convs["conv3_3"] == (56, 56, 256)
  assert convs["conv5_3"] == (14, 14, 512)
  assert blocks["conv5"] == (7, 7, 512)


def test_paper_window_gives_eval_linear_windows_and_dims_for_vgg16(vgg16_224_shapes):
  _, _, convs = vgg16_224_shapes
  got = {name: (pooling.paper_window(shape),
                features_lib.pooled_size(shape, "paper", 10_000)[0])
         for name, shape in convs.items()}
  assert got == PAPER_VGG16_224


def test_paper_window_elsewhere_is_the_smallest_window_below_max_dim():
  # Already below: no pooling (a small network's conv layers at 28 px).
  assert pooling.paper_window((28, 28, 8)) == 1
  # 20x20x32 = 12800 >= 10k; window 2 gives 10x10x32 = 3200.
  assert pooling.paper_window((20, 20, 32)) == 2
  # 30x30x64: window 3 gives 10*10*64 = 6400; window 2 gives 15*15*64 = 14400.
  assert pooling.paper_window((30, 30, 64)) == 3
  # The rule alone would take 13 for conv3-4 at 224 px (8x8 as well); the reference 14.
  assert pooling.paper_window((112, 112, 128), max_dim=10_001) == 13
  assert pooling.paper_window((112, 112, 128)) == 14


def avg_pool2d_reference(x, window):
  """torch's AvgPool2d(window, stride=window), no padding, written out cell by cell."""
  n, h, w, c = x.shape
  oh, ow = h // window, w // window
  out = np.zeros((n, oh, ow, c), np.float64)
  for i in range(oh):
    for j in range(ow):
      cell = x[:, i * window:(i + 1) * window, j * window:(j + 1) * window]
      out[:, i, j] = cell.mean(axis=(1, 2))
  return out.reshape(n, -1)


@pytest.mark.parametrize("shape,window", [((2, 15, 13, 3), 4), ((1, 14, 14, 5), 3),
                                          ((2, 8, 8, 2), 1), ((1, 9, 9, 4), 9)])
def test_window_pool_is_avgpool2d_with_the_ragged_border_dropped(shape, window):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  out = np.asarray(pooling.window_pool(jnp.asarray(x), window))
  expected = avg_pool2d_reference(x, window)
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


# --- the tensors the paper probe reads: pre-pool conv-BN-ReLU outputs -----------------


def conv_bn_relu(x, params, stats, padding):
  y = jax.lax.conv_general_dilated(
      x, params["conv"]["kernel"], (1, 1), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  y = y + params["conv"]["bias"]
  y = (y - stats["bn"]["mean"]) / np.sqrt(stats["bn"]["var"] + 1e-5)
  return np.maximum(np.asarray(y * params["bn"]["scale"] + params["bn"]["bias"]), 0.0)


def max_pool_2x2(x):
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def manual_conv_layers(variables, images, stages, mean, std, use_sobel):
  """Every conv layer's output by hand: normalise -> [Sobel] -> (conv -> BN with running
  statistics -> ReLU)* per stage -> 2x2 max-pool between stages."""
  params, stats = variables["params"], variables["batch_stats"]
  x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  if use_sobel:
    x = sobel(jnp.asarray(x), pad=2)  # then conv1_1 runs VALID (models/sobel.py)
  out = {}
  for i, convs in enumerate(stages, start=1):
    for j in range(1, convs + 1):
      name = f"conv{i}_{j}"
      padding = 0 if (use_sobel and (i, j) == (1, 1)) else 1
      x = conv_bn_relu(x, params[name], stats[name], padding)
      out[name] = x
    x = max_pool_2x2(x)
  return out


def check_conv_layers(model, variables, images, stages, mean, std, use_sobel, names):
  _, blocks, convs = jax.jit(
      lambda v, x: features_lib.apply_layers(model, v, x))(variables, images)
  expected = manual_conv_layers(variables, images, stages, mean, std, use_sobel)
  assert list(convs) == list(expected)
  for name in names:
    assert convs[name].shape == expected[name].shape, name
    assert np.asarray(convs[name]).std() > 0.05, name  # not a dead layer
    np.testing.assert_allclose(np.asarray(convs[name]), expected[name], rtol=1e-4,
                               atol=1e-4, err_msg=name)
  return blocks, convs


@pytest.mark.parametrize("use_sobel", [True, False])
def test_conv_layers_of_small_cnn28_are_pre_pool_conv_bn_relu_outputs(use_sobel):
  model, variables = random_network("small_cnn28", 8, 64, 28, sobel_on=use_sobel)
  images = fashion_mnist_images(4)
  blocks, convs = check_conv_layers(model, variables, images, (1, 1, 1), (0.3,), (0.35,),
                                    use_sobel, ["conv1_1", "conv2_1", "conv3_1"])
  assert convs["conv1_1"].shape == (4, 28, 28, 8)  # before its max-pool ...
  assert blocks["conv1"].shape == (4, 14, 14, 8)   # ... which the block is after
  np.testing.assert_allclose(np.asarray(blocks["conv1"]),
                             max_pool_2x2(np.asarray(convs["conv1_1"])), rtol=1e-6, atol=1e-6)


def test_conv_layers_of_a_thin_vgg16_at_32px_are_pre_pool_conv_bn_relu_outputs():
  model, variables = random_network("vgg16_bn", 4, 32, 32, channels=3, seed=1)
  # Real colour photographs, 32x32 crops of china.jpg and flower.jpg.
  photos = load_sample_images().images
  images = np.stack([photo[100 + 32 * k:132 + 32 * k, 200:232] for photo in photos
                     for k in range(2)]).astype(np.float32) / 255.0
  _, convs = check_conv_layers(model, variables, images, (2, 2, 3, 3, 3), (0.3,) * 3,
                               (0.35,) * 3, True, ["conv1_1", "conv2_2", "conv3_1"])
  assert convs["conv2_2"].shape == (4, 16, 16, 8)
  assert convs["conv3_1"].shape == (4, 8, 8, 16)
  assert len(convs) == 13


# --- extract_features ---------------------------------------------------------------


def test_extract_features_shapes_padding_and_eval_mode(fmnist_train):
  model, variables = random_network("small_cnn28", 16, 128, 28)
  feature_dim, blocks, convs = features_lib.layer_shapes(model, variables, 28, 1)
  assert feature_dim == 128
  assert blocks == {"conv1": (14, 14, 16), "conv2": (7, 7, 32), "conv3": (3, 3, 64)}
  assert convs == {"conv1_1": (28, 28, 16), "conv2_1": (14, 14, 32), "conv3_1": (7, 7, 64)}
  idx = np.arange(37, 37 + 70)
  # 70 images in batches of 32: the last batch is padded, the padding dropped.
  a = features_lib.extract_features(model, variables, fmnist_train, batch_size=32,
                                    layers="all", indices=idx)
  assert {k: v.shape for k, v in a.items()} == {
      FEATURES: (70, 128), "conv1": (70, 3136), "conv2": (70, 1568), "conv3": (70, 576)}
  # Same rows whatever the batching (eval mode: dropout off, BN running stats).
  b = features_lib.extract_features(model, variables, fmnist_train, batch_size=512,
                                    layers=["conv2"], indices=idx)
  assert set(b) == {FEATURES, "conv2"}
  np.testing.assert_allclose(a[FEATURES], b[FEATURES], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a["conv2"], b["conv2"], rtol=1e-5, atol=1e-5)
  # Block 'conv3' is the stage output the backbone returns, flattened (no pooling).
  x = fmnist_train.images(idx[:3]).astype(np.float32) / 255
  features, blocks = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(a["conv3"][:3], np.asarray(blocks["conv3"]).reshape(3, -1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a[FEATURES][:3], np.asarray(features), rtol=1e-5, atol=1e-5)
  assert features_lib.extract_features(model, variables, fmnist_train,
                                       indices=idx).keys() == {FEATURES}
  with pytest.raises(ValueError, match="conv9"):
    features_lib.extract_features(model, variables, fmnist_train, layers=["conv9"],
                                  indices=idx)


def test_extract_conv_layers_with_the_paper_pooling(fmnist_train):
  model, variables = random_network("small_cnn28", 16, 64, 28)
  idx = np.arange(10)
  out = features_lib.extract_features(model, variables, fmnist_train, layers="conv1_1,conv3_1",
                                      indices=idx, pooling_rule="paper", max_dim=3000)
  # conv1_1 28x28x16 = 12544 -> window 3: 9x9x16 = 1296 (window 2: 14x14x16 = 3136 >= 3000).
  assert out["conv1_1"].shape == (10, 1296)
  assert out["conv3_1"].shape == (10, 576)  # 7x7x64 = 3136 >= 3000 -> window 2: 3x3x64
  # The values: window_pool of the pre-pool conv outputs.
  x = fmnist_train.images(idx).astype(np.float32) / 255
  _, _, convs = features_lib.apply_layers(model, variables, x)
  np.testing.assert_allclose(out["conv1_1"], np.asarray(pooling.window_pool(convs["conv1_1"], 3)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["conv3_1"], np.asarray(pooling.window_pool(convs["conv3_1"], 2)),
                             rtol=1e-5, atol=1e-5)


def test_extract_features_on_8_devices_matches_one_device(with_devices):
  out = with_devices("""
    import json, jax, numpy as np
    from deeper_jax.data import load_fashion_mnist
    from deeper_jax.extract.features import extract_features
    from deeper_jax.models import build_backbone
    from deeper_jax.runtime.mesh import make_mesh
    import configs.tiny
    config = configs.tiny.get_config()
    train = load_fashion_mnist('test')
    module = build_backbone(config.model)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x),
                            jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: 0.5 + 0.3 * np.abs(rng.normal(size=s.shape)), shapes)
    idx = np.arange(100)
    one = extract_features(module, variables, train, batch_size=20, layers='all',
                           indices=idx)
    many = extract_features(module, variables, train, batch_size=20, layers='all',
                            indices=idx, mesh=make_mesh())
    print(json.dumps({'devices': jax.device_count(),
                      'keys': sorted(many),
                      'err': max(float(np.abs(one[k] - many[k]).max()) for k in one)}))
  """)
  assert out["devices"] == 8
  assert out["keys"] == ["conv1", "conv2", "conv3", "features"]
  assert out["err"] < 1e-4
