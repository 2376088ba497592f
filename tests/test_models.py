"""Backbones: shapes, parameter names and counts, initialisation, train/eval behaviour."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import fashion_mnist_images, test_config
from deeper_jax.models import build_backbone

# torchvision.models.vgg16_bn() has 138,365,992 parameters (BatchNorm running statistics
# are buffers, not parameters); dropping its last layer, Linear(4096, 1000), removes
# 4096·1000 + 1000. test_vgg16_param_count_formula re-derives it from the layer table.
TORCHVISION_VGG16_BN_WITHOUT_LAST_LAYER = 138_365_992 - (4096 * 1000 + 1000)
VGG16_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
               "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")


def config(name, **fields):
  """The default ``config.model`` as network ``name`` at its own width and feature size,
  without Sobel, mean/std 0.5, then ``fields``."""
  model = test_config("default").model
  model.update(dict(name=name, width=0, feature_dim=0, sobel=False, mean=(0.5,), std=(0.5,)))
  model.update(fields)
  return model


def param_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def paths(tree) -> dict[str, tuple[int, ...]]:
  return {"/".join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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


def test_parameter_names_are_those_of_existing_checkpoints():
  """conv{i}_{j}/conv/{kernel,bias}, conv{i}_{j}/bn/{scale,bias} (+ mean/var), fc6, fc7."""
  model = build_backbone(config("vgg16_bn", width=8, feature_dim=32, sobel=True))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  expected, stats, c_in = {}, {}, 2  # conv1_1 reads the two Sobel maps
  for name, c_out in zip(VGG16_CONVS, (8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64)):
    expected[f"{name}/conv/kernel"] = (3, 3, c_in, c_out)
    expected[f"{name}/conv/bias"] = (c_out,)
    expected[f"{name}/bn/scale"] = expected[f"{name}/bn/bias"] = (c_out,)
    stats[f"{name}/bn/mean"] = stats[f"{name}/bn/var"] = (c_out,)
    c_in = c_out
  expected.update({"fc6/kernel": (64, 32), "fc6/bias": (32,),
                   "fc7/kernel": (32, 32), "fc7/bias": (32,)})
  assert set(variables) == {"params", "batch_stats"}
  assert paths(variables["params"]) == expected
  assert paths(variables["batch_stats"]) == stats


def test_small_cnn_parameter_names():
  model = build_backbone(config("small_cnn28", width=4, feature_dim=8))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  assert sorted(params) == ["conv1_1", "conv2_1", "conv3_1", "fc6", "fc7"]
  assert paths(params)["conv3_1/conv/kernel"] == (3, 3, 8, 16)
  assert paths(params)["fc6/kernel"] == (3 * 3 * 16, 8)


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
  """features = relu(fc6(flatten(last block)))·W7 + b7, recomputed here from the params."""
  model, variables, x = small
  features, blocks = jax.jit(model.apply)(variables, x)  # eval mode: no dropout
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  flat = np.asarray(blocks["conv3"], np.float64).reshape(len(x), -1)
  h = np.maximum(flat @ p["fc6"]["kernel"] + p["fc6"]["bias"], 0.0)
  expected = h @ p["fc7"]["kernel"] + p["fc7"]["bias"]
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
  assert (expected < 0).any()  # a ReLU after fc7 would have visibly clipped these


def test_conv_init_is_he_fan_out_and_bn_starts_as_identity(small):
  _, variables, _ = small
  params = variables["params"]
  kernel = np.asarray(params["conv3_1"]["conv"]["kernel"])  # 3×3×64×128
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.05)
  assert np.all(params["conv3_1"]["conv"]["bias"] == 0)
  assert np.all(params["conv3_1"]["bn"]["scale"] == 1)
  assert np.all(params["conv3_1"]["bn"]["bias"] == 0)


@pytest.mark.parametrize("layer,fan_in", [("fc6", 3 * 3 * 128), ("fc7", 256)])
def test_torch_fc_init_is_uniform_in_plus_minus_one_over_sqrt_fan_in(small, layer, fan_in):
  _, variables, _ = small
  p = variables["params"][layer]
  assert p["kernel"].shape[0] == fan_in
  bound = 1 / np.sqrt(fan_in)
  for value in (np.asarray(p["kernel"]), np.asarray(p["bias"])):
    assert np.abs(value).max() <= bound
    assert np.abs(value).max() > 0.95 * bound      # fills the range ...
    np.testing.assert_allclose(value.std(), bound / np.sqrt(3), rtol=0.1)  # ... uniformly


def test_normal_fc_init_is_n_0_001_with_zero_bias():
  model = build_backbone(config("small_cnn28", fc_init="normal"))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  for layer in ("fc6", "fc7"):
    np.testing.assert_allclose(np.asarray(params[layer]["kernel"]).std(), 0.01, rtol=0.05)
    assert abs(float(np.asarray(params[layer]["kernel"]).mean())) < 1e-3
    assert np.all(params[layer]["bias"] == 0)


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


def test_bfloat16_compute_keeps_float32_params_and_features(small):
  _, variables, x = small
  model = build_backbone(config("small_cnn28", dtype="bfloat16"))
  f32 = jax.jit(build_backbone(config("small_cnn28")).apply)(variables, x)[0]
  bf16 = jax.jit(model.apply)(variables, x)[0]
  assert bf16.dtype == jnp.float32
  assert np.corrcoef(np.ravel(bf16), np.ravel(f32))[0, 1] > 0.99


@pytest.mark.parametrize("field,value,match", [
    ("name", "resnet50", "model.name"),
    ("dtype", "float16", "model.dtype"),
    ("fc_init", "xavier", "model.fc_init"),
])
def test_bad_config_fields_are_named_in_the_error(field, value, match):
  cfg = config("small_cnn28")
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    build_backbone(cfg)


@pytest.mark.parametrize("field", sorted(test_config("default").model))
def test_every_model_field_is_read(field):
  """Strict: a config missing any declared field is an error, not a silent default."""
  cfg = config("small_cnn28").to_dict()
  del cfg[field]
  with pytest.raises((AttributeError, KeyError)):
    build_backbone(ml_collections.ConfigDict(cfg))


def test_mean_with_the_wrong_number_of_channels_is_rejected():
  model = build_backbone(config("small_cnn28", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
  with pytest.raises(ValueError, match="model.mean"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 2)))
