"""Backbones: shapes, parameter counts, train/eval behaviour, conv implementations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import fashion_mnist_images
from deeper_jax.models import build_backbone, resolve_conv_impl


# torchvision.models.vgg16_bn() has 138,365,992 parameters (BatchNorm running statistics
# are buffers, not parameters); dropping its last layer, Linear(4096, 1000), removes
# 4096·1000 + 1000. test_vgg16_param_count_formula re-derives it from the layer table.
TORCHVISION_VGG16_BN_WITHOUT_LAST_LAYER = 138_365_992 - (4096 * 1000 + 1000)


def config(name, **kw):
  return ml_collections.ConfigDict(dict(name=name, **kw))




def param_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def small():
  """small_cnn28 at its defaults, initialised once, with 8 real images."""
  model = build_backbone(config("small_cnn28"))
  x = jnp.asarray(fashion_mnist_images(8))
  return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_vgg16_param_count_formula():
  convs = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  conv = sum(9 * a * b + b + 2 * b for a, b in zip(convs, convs[1:]))  # w, bias, BN γ β
  fc = (25088 * 4096 + 4096) + (4096 * 4096 + 4096)
  assert conv + fc == TORCHVISION_VGG16_BN_WITHOUT_LAST_LAYER == 134_268_992


def test_vgg16_bn_matches_torchvision_parameter_count_at_224():
  model = build_backbone(config("vgg16_bn"))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert param_count(variables["params"]) == TORCHVISION_VGG16_BN_WITHOUT_LAST_LAYER
  assert variables["params"]["fc6"]["kernel"].shape == (25088, 4096)
  # Running statistics live apart from the parameters: mean and var of 13 BN layers.
  assert param_count(variables["batch_stats"]) == 2 * 4224


@pytest.mark.parametrize("name,shape,dim,blocks", [
    ("small_cnn28", (2, 28, 28, 1), 256,
     {"conv1": (14, 14, 32), "conv2": (7, 7, 64), "conv3": (3, 3, 128)}),
    ("small_cnn32", (2, 32, 32, 3), 256,
     {"conv1": (16, 16, 32), "conv2": (8, 8, 64), "conv3": (4, 4, 128)}),
    ("alexnet_bn", (2, 224, 224, 3), 4096,
     {"conv1": (27, 27, 96), "conv2": (13, 13, 256), "conv3": (13, 13, 384),
      "conv4": (13, 13, 384), "conv5": (6, 6, 256)}),
    ("vgg16_bn", (2, 224, 224, 3), 4096,
     {"conv1": (112, 112, 64), "conv2": (56, 56, 128), "conv3": (28, 28, 256),
      "conv4": (14, 14, 512), "conv5": (7, 7, 512)}),
])
@pytest.mark.parametrize("sobel", [False, True])
def test_feature_and_block_shapes_at_the_reference_sizes(name, shape, dim, blocks, sobel):
  model = build_backbone(config(name, sobel=sobel))
  assert model.feature_dim == dim
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  features, out_blocks = jax.eval_shape(model.apply, variables, jnp.zeros(shape))
  assert features.shape == (2, dim) and features.dtype == jnp.float32
  assert list(out_blocks) == list(blocks)  # in network order
  assert {k: v.shape[1:] for k, v in out_blocks.items()} == blocks


def test_small_vgg_runs_on_32px_and_leading_axes_are_batch_axes():
  model = build_backbone(config("vgg16_bn", width=8, feature_dim=32))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 3, 32, 32, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x[0])
  f, blocks = jax.jit(model.apply)(variables, x)  # [S, b, H, W, C] input
  f_flat, _ = jax.jit(model.apply)(variables, x.reshape(6, 32, 32, 3))
  assert f.shape == (2, 3, 32) and blocks["conv5"].shape == (2, 3, 1, 1, 64)
  np.testing.assert_allclose(f.reshape(6, 32), f_flat, rtol=1e-5, atol=1e-6)


def test_features_are_fc7_before_relu(small):
  model, variables, x = small
  features, _ = jax.jit(model.apply)(variables, x)
  assert (features < 0).any() and (features > 0).any()
  assert np.isfinite(features).all()


def test_conv_init_is_he_fan_out_and_bn_starts_as_identity(small):
  _, variables, _ = small
  params = variables["params"]
  kernel = np.asarray(params["conv3_1"]["conv"]["kernel"])  # 3×3×64×128
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.05)
  assert np.all(params["conv3_1"]["conv"]["bias"] == 0)
  assert np.all(params["conv3_1"]["bn"]["scale"] == 1)
  np.testing.assert_allclose(np.asarray(params["fc6"]["kernel"]).std(), 0.01, rtol=0.05)


def test_dropout_is_active_only_in_train_mode(small):
  model, variables, x = small
  def run(train, seed):
    return jax.jit(lambda v, k: model.apply(v, x, train=train, rngs={"dropout": k},
                                            mutable=["batch_stats"])[0][0])(
        variables, jax.random.key(seed))
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert not np.allclose(run(True, 0), run(True, 1))
  np.testing.assert_array_equal(run(True, 2), run(True, 2))
  # Without dropout, train mode is deterministic too.
  no_drop = build_backbone(config("small_cnn28", dropout=0.0))
  a = no_drop.apply(variables, x[:2], train=True, mutable=["batch_stats"])[0][0]
  b = no_drop.apply(variables, x[:2], train=True, mutable=["batch_stats"])[0][0]
  np.testing.assert_array_equal(a, b)


def test_batch_stats_update_only_in_train_mode(small):
  model, variables, x = small
  _, updated = jax.jit(lambda v: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                             mutable=["batch_stats"]))(variables)
  before = variables["batch_stats"]["conv1_1"]["bn"]
  after = updated["batch_stats"]["conv1_1"]["bn"]
  # Momentum 0.9: mean ← 0.9·0 + 0.1·batch mean, var ← 0.9·1 + 0.1·batch var.
  assert not np.allclose(after["mean"], before["mean"])
  assert np.all(np.asarray(after["var"]) > 0.9 - 1e-6)
  _, same = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])


def test_eval_mode_treats_each_image_independently(small):
  model, variables, x = small
  apply = jax.jit(model.apply)
  one = apply(variables, x[:1])[0]
  batch = apply(variables, x)[0]
  np.testing.assert_allclose(batch[:1], one, rtol=1e-4, atol=1e-5)


def test_normalisation_happens_inside_the_model(small):
  _, variables, x = small
  shifted = build_backbone(config("small_cnn28", mean=(0.2,), std=(0.3,)))
  identity = build_backbone(config("small_cnn28", mean=(0.0,), std=(1.0,)))
  np.testing.assert_allclose(jax.jit(shifted.apply)(variables, x)[0],
                             jax.jit(identity.apply)(variables, (x - 0.2) / 0.3)[0],
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,shape", [
    ("small_cnn28", (4, 28, 28, 1)),
    ("alexnet_bn", (2, 67, 67, 3)),  # 11×11 stride 4, overlapping 3×3/2 pools
    ("vgg16_bn", (8, 32, 32, 3)),  # 8: BatchNorm over the 1x1 last block is not degenerate
])
def test_conv_implementations_agree(name, shape):
  """Width 16, so that the AMX kernels take every conv past the first (where present)."""
  from deeper_jax.models import amx_conv
  x = jnp.asarray(np.random.default_rng(1).uniform(size=shape), jnp.float32)
  impls = ("xla", "patches", "hybrid") + (() if amx_conv.unavailable_reason() else ("amx",))
  xla, *others = (build_backbone(config(name, width=16, feature_dim=16, conv_impl=c))
                  for c in impls)
  variables = jax.jit(xla.init)(jax.random.key(0), x)

  def loss(model):
    def f(p):
      (feat, blocks), _ = model.apply({**variables, "params": p}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
      return jnp.sum(feat ** 2), (feat, blocks)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])

  (_, (f1, b1)), g1 = loss(xla)
  for impl, other in zip(impls[1:], others):
    (_, (f2, b2)), g2 = loss(other)
    # amx's products carry ~1e-5 relative error (vs float32's ~1e-7); train-mode BN over
    # tiny batches compounds it with depth: measured 6e-6 -> 1.2e-4 of max|block| from
    # VGG's conv1 to conv5 blocks here.
    tol = 5e-4 if impl == "amx" else 1e-4
    np.testing.assert_allclose(f2, f1, rtol=tol, atol=tol * float(np.abs(f1).max()))
    for k in b1:
      np.testing.assert_allclose(b2[k], b1[k], rtol=tol, atol=tol * max(1.0, float(np.abs(b1[k]).max())))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * float(np.abs(a).max()) + 1e-7)


@pytest.mark.parametrize("side,routed", [(2, True), (4, True), (5, False)])
def test_hybrid_runs_tiny_images_as_patches(side, routed):
  """XLA CPU's conv kernel for tiny images is ~80x slower than im2col x GEMM (conv.py)."""
  from deeper_jax.models.conv import SMALL_IMAGE, Conv2D
  assert (side * side <= SMALL_IMAGE) == routed
  layer = Conv2D(features=8, kernel_size=3, padding=1, conv_impl="hybrid")
  x = jnp.ones((2, side, side, 4))
  variables = layer.init(jax.random.key(0), x)
  hlo = jax.jit(layer.apply).lower(variables, x).as_text()
  assert ("convolution" in hlo) != routed
  reference = Conv2D(features=8, kernel_size=3, padding=1, conv_impl="xla").apply(variables, x)
  np.testing.assert_allclose(layer.apply(variables, x), reference, rtol=1e-5, atol=1e-5)


def test_explicit_conv_impls_resolve_to_themselves():
  for impl in ("xla", "patches", "hybrid"):
    assert resolve_conv_impl(impl) == impl
  with pytest.raises(ValueError, match="model.conv_impl must be one of"):
    resolve_conv_impl("winograd")


def test_bfloat16_compute_keeps_float32_params_and_features(small):
  _, variables, x = small
  model = build_backbone(config("small_cnn28", dtype="bfloat16"))
  f32 = jax.jit(build_backbone(config("small_cnn28")).apply)(variables, x)[0]
  bf16 = jax.jit(model.apply)(variables, x)[0]
  assert bf16.dtype == jnp.float32
  assert np.corrcoef(np.ravel(bf16), np.ravel(f32))[0, 1] > 0.99


@pytest.mark.parametrize("field,value,match", [
    ("name", "resnet50", "model.name"),
    ("conv_impl", "winograd", "model.conv_impl"),
    ("dtype", "float16", "model.dtype"),
    ("dropout", 1.0, "model.dropout"),
])
def test_bad_config_fields_are_named_in_the_error(field, value, match):
  cfg = config("small_cnn28")
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    build_backbone(cfg)


def test_mean_with_the_wrong_number_of_channels_is_rejected():
  model = build_backbone(config("small_cnn28", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
  with pytest.raises(ValueError, match="model.mean"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 2)))


@pytest.mark.parametrize("kernel,stride,padding,channels", [
    (3, 1, 1, 16), (3, 1, 0, 16), (5, 1, 2, 16),  # GEMM kernel gradient
    (3, 1, 1, 3), (11, 4, 2, 16)])                 # XLA's (few channels, strided)
def test_hybrid_conv_gradients_equal_xlas(kernel, stride, padding, channels):
  from deeper_jax.models.conv import _xla_conv, hybrid_conv
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 23, 19, channels)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, channels, 5)), jnp.float32)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, stride, padding)))
  y1, y2 = hybrid_conv(x, k, stride, padding), _xla_conv(x, k, stride, padding)
  np.testing.assert_array_equal(y1, y2)
  g1 = jax.grad(loss(hybrid_conv), argnums=(0, 1))(x, k)
  g2 = jax.grad(loss(_xla_conv), argnums=(0, 1))(x, k)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
