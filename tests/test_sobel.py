"""The Sobel front end: its responses, that it is frozen, and that folding it is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from conftest import fashion_mnist_images, test_config
from deeper_jax.models import build_backbone, fold_sobel, sobel
from deeper_jax.models.sobel import FIRST_CONV, SOBEL_X, SOBEL_Y, fold_kernel


def rgb_images(n: int, size: int) -> np.ndarray:
  """Real-looking RGB: Fashion-MNIST upsampled, channels tinted differently."""
  x = fashion_mnist_images(n)[..., 0]
  x = np.asarray(jax.image.resize(x, (n, size, size), "bilinear"))
  return np.clip(np.stack([x, 0.8 * x + 0.1, 1.0 - 0.6 * x], axis=-1), 0.0, 1.0)


def config(name, **fields):
  """The default ``config.model`` as network ``name`` without Sobel, then ``fields``."""
  model = test_config("default").model
  model.update(dict(name=name, sobel=False, mean=(0.5,), std=(0.5,)))
  model.update(fields)
  return model


def conv(x, kernel, padding):
  """Stride-1 cross-correlation of NHWC images with an HWIO kernel, zero padding."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding),) * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)


def test_sobel_kernels_are_the_papers():
  np.testing.assert_array_equal(SOBEL_X, [[1, 0, -1], [2, 0, -2], [1, 0, -1]])
  np.testing.assert_array_equal(SOBEL_Y, np.transpose(SOBEL_X))


def test_sobel_responses_match_scipy_correlation_on_a_real_image():
  img = fashion_mnist_images(3)
  out = np.asarray(sobel(jnp.asarray(img), pad=1))
  assert out.shape == (3, 28, 28, 2)
  for b in range(3):
    for c, k in enumerate((SOBEL_X, SOBEL_Y)):
      expected = ndimage.correlate(img[b, :, :, 0].astype(np.float64), k, mode="constant")
      np.testing.assert_allclose(out[b, :, :, c], expected, atol=1e-5)
  # A real garment has edges: the responses are not trivially zero.
  assert np.abs(out).max() > 1.0


def test_sobel_grayscale_is_the_channel_mean_and_padding_grows_the_map():
  rgb = rgb_images(2, 28)
  out = np.asarray(sobel(jnp.asarray(rgb), pad=2))
  assert out.shape == (2, 30, 30, 2)
  gray = rgb.mean(axis=-1)
  expected = ndimage.correlate(np.pad(gray[1], 2), SOBEL_Y, mode="constant")[1:-1, 1:-1]
  np.testing.assert_allclose(out[1, :, :, 1], expected, atol=1e-5)


def test_sobel_of_a_constant_image_is_zero_inside():
  out = np.asarray(sobel(jnp.full((1, 8, 8, 3), 0.7), pad=1))
  np.testing.assert_allclose(out[0, 1:-1, 1:-1], 0.0, atol=1e-6)


@pytest.mark.parametrize("name,shape", [("small_cnn28", (1, 28, 28, 1)),
                                        ("vgg16_bn", (1, 32, 32, 3))])
def test_sobel_stage_has_no_parameters(name, shape):
  plain = build_backbone(config(name, width=8, feature_dim=16))
  with_sobel = build_backbone(config(name, width=8, feature_dim=16, sobel=True))
  p0 = jax.eval_shape(plain.init, jax.random.key(0), jnp.zeros(shape))["params"]
  p1 = jax.eval_shape(with_sobel.init, jax.random.key(0), jnp.zeros(shape))["params"]
  assert set(p0) == set(p1)  # no extra module: the Sobel kernels are constants
  assert p1[FIRST_CONV]["conv"]["kernel"].shape[2] == 2  # conv1 reads the 2 Sobel maps
  # The only difference is conv1's input channels (C → 2): 3·3·(C-2)·width weights.
  count = lambda p: sum(x.size for x in jax.tree.leaves(p))
  assert count(p0) - count(p1) == 9 * (shape[-1] - 2) * 8


def test_sobel_receives_no_gradient_and_changes_the_output():
  model = build_backbone(config("small_cnn28", width=8, feature_dim=16, sobel=True))
  x = jnp.asarray(fashion_mnist_images(4))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  grads = jax.jit(jax.grad(
      lambda p: model.apply({**variables, "params": p}, x)[0].sum()))(variables["params"])
  assert set(grads) == set(variables["params"])
  plain = build_backbone(config("small_cnn28", width=8, feature_dim=16))
  pv = jax.jit(plain.init)(jax.random.key(0), x)
  assert not np.allclose(jax.jit(model.apply)(variables, x)[0],
                         jax.jit(plain.apply)(pv, x)[0])


def _perturb_stats(variables, seed=1):
  """Non-trivial running statistics, so eval mode is not an identity BatchNorm."""
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(
      lambda s: s + rng.uniform(0.1, 0.5, s.shape).astype(np.float32),
      variables["batch_stats"])
  return {**variables, "batch_stats": stats}


@pytest.mark.parametrize("name,images,train", [
    ("small_cnn28", lambda: fashion_mnist_images(8), False),
    ("small_cnn28", lambda: fashion_mnist_images(8), True),
    ("vgg16_bn", lambda: rgb_images(4, 32), False),
    ("alexnet_bn", lambda: rgb_images(2, 67), False),  # 11×11 stride-4 conv1, padding 2
])
def test_folded_network_equals_the_original_everywhere(name, images, train):
  x = jnp.asarray(images())
  cfg = config(name, width=8, feature_dim=32, sobel=True, dropout=0.0,
               mean=(0.45,) * x.shape[-1], std=(0.25,) * x.shape[-1])
  model = build_backbone(cfg)
  variables = _perturb_stats(jax.jit(model.init)(jax.random.key(0), x))
  folded_cfg, folded_vars = fold_sobel(cfg, variables, in_channels=x.shape[-1])
  assert not folded_cfg.sobel and folded_cfg.folded_sobel and cfg.sobel  # input untouched
  k = variables["params"][FIRST_CONV]["conv"]["kernel"].shape[0]
  assert folded_vars["params"][FIRST_CONV]["conv"]["kernel"].shape[:3] == (
      k + 2, k + 2, x.shape[-1])
  folded = build_backbone(folded_cfg)
  kw = dict(train=train, mutable=["batch_stats"]) if train else {}
  out = jax.jit(lambda v: model.apply(v, x, **kw))(variables)
  folded_out = jax.jit(lambda v: folded.apply(v, x, **kw))(folded_vars)
  if train:
    (out, stats), (folded_out, folded_stats) = out, folded_out
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(folded_stats)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  (f, blocks), (ff, fblocks) = out, folded_out
  scale = float(np.abs(f).max())
  np.testing.assert_allclose(ff, f, atol=1e-5 * scale, rtol=1e-5)
  for name_ in blocks:  # every pixel, borders included
    b = np.asarray(blocks[name_])
    np.testing.assert_allclose(fblocks[name_], b, atol=1e-5 * np.abs(b).max(), rtol=1e-5)


def test_fold_sobel_default_channels_follow_the_mean():
  x = jnp.asarray(fashion_mnist_images(2))
  cfg = config("small_cnn28", width=4, feature_dim=8, sobel=True)
  model = build_backbone(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  folded_cfg, folded_vars = fold_sobel(cfg, variables)  # mean (0.5,) → 1 channel
  assert folded_vars["params"][FIRST_CONV]["conv"]["kernel"].shape[2] == 1
  assert cfg.sobel and not folded_cfg.sobel and folded_cfg.folded_sobel
  np.testing.assert_allclose(jax.jit(build_backbone(folded_cfg).apply)(folded_vars, x)[0],
                             jax.jit(model.apply)(variables, x)[0], atol=1e-5)


def test_fold_sobel_rejects_a_network_without_sobel():
  cfg = config("small_cnn28", width=4, feature_dim=8)
  variables = jax.jit(build_backbone(cfg).init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="sobel"):
    fold_sobel(cfg, variables)


def test_why_the_sobel_map_is_padded_wider_than_the_image():
  """Naive SAME→SAME folds only in the interior; our pad-(p+1)/VALID stack folds exactly."""
  x = jnp.asarray(fashion_mnist_images(2) - 0.5)  # normalised: the border is not zero
  w1 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2, 4)), jnp.float32)
  folded = conv(x, jnp.asarray(fold_kernel(np.asarray(w1), 1)), 2)
  ours = conv(sobel(x, pad=2), w1, 0)
  naive = conv(sobel(x, pad=1), w1, 1)
  np.testing.assert_allclose(ours, folded, atol=1e-4)
  np.testing.assert_allclose(naive[:, 1:-1, 1:-1], folded[:, 1:-1, 1:-1], atol=1e-4)
  assert np.abs(np.asarray(naive - folded)[:, 0]).max() > 0.1  # the border ring differs
