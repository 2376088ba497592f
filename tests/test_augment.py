"""Training views (deeper_jax.augment): torchvision's RandomResizedCrop + flip, as the
reference trains with, and the older zero-padded crop.

The crop statistics are compared with the distribution RandomResizedCrop really draws:
area fraction ``a ~ U[0.08, 1]`` and log aspect ``t ~ U[-L, L]`` (L = log 4/3),
*kept only when the box fits* (up to 10 tries). On a square image a box fits iff
``a ≤ exp(-|t|)``, so large areas are thinned (mean 0.478, not 0.54) and the aspect
leans toward square; those conditional distributions are computed here by numerical
integration, independently of the code under test.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fashion_mnist_images, test_config
from deeper_jax import augment

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
L = math.log(4 / 3)
NUM_DRAWS = 20_000


def china_plus_one() -> np.ndarray:
  """scikit-learn's china.jpg (427×640 RGB) + 1: a real photo with no pixel at 0."""
  from sklearn.datasets import load_sample_images
  return load_sample_images().images[0].astype(np.float32) + 1.0


@pytest.fixture(scope="module")
def boxes_256():
  boxes = augment.crop_boxes(jax.random.key(0), NUM_DRAWS, 256, 256, SCALE, RATIO)
  return np.asarray(boxes)


def fitting_density(grid: np.ndarray, of: str) -> np.ndarray:
  """Unnormalised density of the kept area fraction or log aspect on a square image."""
  if of == "area":  # P(|t| ≤ -log a) for t ~ U[-L, L]
    return np.where(grid <= math.exp(-L), 1.0, -np.log(grid) / L)
  return np.clip(np.exp(-np.abs(grid)) - SCALE[0], 0, None)  # P(a ≤ exp(-|t|))


def conditional_cdf(values: np.ndarray, low: float, high: float, of: str) -> np.ndarray:
  grid = np.linspace(low, high, 200_001)
  cdf = np.cumsum(fitting_density(grid, of))
  return np.interp(values, grid, cdf / cdf[-1])


def test_boxes_lie_inside_the_image_on_whole_pixels(boxes_256):
  top, left, h, w = boxes_256.T
  assert boxes_256.shape == (NUM_DRAWS, 4)
  np.testing.assert_array_equal(boxes_256, np.round(boxes_256))
  assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
  assert (top + h <= 256).all() and (left + w <= 256).all()


def test_area_fraction_is_uniform_over_the_boxes_that_fit(boxes_256):
  area = boxes_256[:, 2] * boxes_256[:, 3] / 256**2
  # Rounding h and w to pixels moves the fraction by < 1.5% at the smallest boxes.
  assert area.min() >= SCALE[0] * 0.98 and area.max() <= 1.0
  grid = np.linspace(SCALE[0], 1, 200_001)
  density = fitting_density(grid, "area")
  expected_mean = float((grid * density).sum() / density.sum())
  assert expected_mean == pytest.approx(0.478, abs=1e-3)
  assert area.mean() == pytest.approx(expected_mean, abs=0.01)
  # Kolmogorov-Smirnov distance to the conditional uniform (5σ ≈ 0.014 at 20k draws).
  ecdf = np.arange(1, NUM_DRAWS + 1) / NUM_DRAWS
  sorted_area = np.sort(area)
  assert np.abs(ecdf - conditional_cdf(sorted_area, SCALE[0], 1, "area")).max() < 0.02
  # In particular the small crops are as frequent as U[0.08, 1] makes them.
  below_half = np.mean(area < 0.5)
  assert below_half == pytest.approx(conditional_cdf(np.array(0.5), SCALE[0], 1, "area"),
                                     abs=0.015)


def test_log_aspect_ratio_is_uniform_over_the_boxes_that_fit(boxes_256):
  log_aspect = np.log(boxes_256[:, 3] / boxes_256[:, 2])
  slack = 0.5 / 72 * 2  # h and w rounded to pixels, boxes ≥ 72 px (8% of 256²)
  assert log_aspect.min() >= -L - slack and log_aspect.max() <= L + slack
  assert abs(log_aspect.mean()) < 0.01  # wide and tall alike
  ecdf = np.arange(1, NUM_DRAWS + 1) / NUM_DRAWS
  sorted_t = np.sort(log_aspect)
  assert np.abs(ecdf - conditional_cdf(sorted_t, -L, L, "aspect")).max() < 0.02
  # Spread over the whole range, not collapsed to squares.
  assert np.mean(np.abs(log_aspect) > L / 2) > 0.35


def test_box_position_is_uniform_over_where_it_fits(boxes_256):
  top, left, h, w = boxes_256.T
  for offset, side in ((top, h), (left, w)):
    room = 256 - side
    fraction = (offset + 0.5) / (room + 1)  # uniform on (0, 1) for randint(0, room + 1)
    assert fraction[room > 0].mean() == pytest.approx(0.5, abs=0.01)
    assert np.mean(fraction[room > 20] < 0.25) == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("height,width,expected", [
    (256, 256, (0, 0, 256, 256)),     # square: the whole image
    (100, 300, (0, 83, 100, 133)),    # too wide: the central 4:3 box
    (300, 100, (83, 0, 133, 100)),    # too tall: the central 3:4 box
])
def test_when_no_try_fits_the_box_is_the_central_one(height, width, expected):
  boxes = augment.crop_boxes(jax.random.key(1), 50, height, width, (2.0, 3.0), RATIO)
  np.testing.assert_array_equal(np.asarray(boxes), np.tile(expected, (50, 1)))


def test_non_square_images_get_boxes_inside_them():
  boxes = np.asarray(augment.crop_boxes(jax.random.key(2), 5000, 427, 640, SCALE, RATIO))
  top, left, h, w = boxes.T
  assert (top + h <= 427).all() and (left + w <= 640).all() and (top >= 0).all()
  area = h * w / (427 * 640)
  assert area.min() >= 0.079 and area.max() <= 1.0


def test_resizing_a_box_of_the_output_size_is_an_exact_slice():
  x = jnp.asarray(china_plus_one()[None, :200, :300])
  boxes = jnp.asarray([[10.0, 30.0, 64.0, 64.0]])
  out = augment.resize_boxes(x, boxes, 64)
  np.testing.assert_allclose(out[0], x[0, 10:74, 30:94], atol=1e-3)
  whole = augment.resize_boxes(x[:, :64, :64], jnp.asarray([[0.0, 0.0, 64.0, 64.0]]), 64)
  np.testing.assert_allclose(whole, x[:, :64, :64], atol=1e-3)


def test_random_resized_crops_of_a_real_photo_have_no_dark_border():
  """Sampling only inside the box: no pixel darker than the source's darkest (≥ 1)."""
  photo = china_plus_one()
  x = jnp.asarray(np.stack([photo[:, :427], photo[:, 213:]]))  # two 427×427 views
  lo, hi = float(photo.min()), float(photo.max())
  assert lo >= 1.0
  for seed in range(4):
    for size in (64, 224):  # shrinking and enlarging boxes
      out = np.asarray(augment.random_resized_crop(jax.random.key(seed), x, size))
      assert out.shape == (2, size, size, 3)
      assert out.min() >= lo - 1e-3 and out.max() <= hi + 1e-3
      # Every border row and column is a real image row, not padding.
      for border in (out[:, 0], out[:, -1], out[:, :, 0], out[:, :, -1]):
        assert border.min() >= lo - 1e-3


def test_the_crop_of_a_constant_image_is_that_constant_everywhere():
  x = jnp.full((64, 40, 40, 1), 0.7, jnp.float32)
  out = np.asarray(augment.random_resized_crop(jax.random.key(3), x, 28))
  np.testing.assert_allclose(out, 0.7, atol=1e-5)


def test_same_rng_same_crops_other_rng_other_crops():
  x = jnp.asarray(fashion_mnist_images(16))
  a = augment.random_resized_crop(jax.random.key(5), x, 28)
  b = augment.random_resized_crop(jax.random.key(5), x, 28)
  c = augment.random_resized_crop(jax.random.key(6), x, 28)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_random_flip_mirrors_about_half_of_the_images():
  x = jnp.asarray(fashion_mnist_images(400))
  out = np.asarray(augment.random_flip(jax.random.key(0), x))
  same = np.all(out == np.asarray(x), axis=(1, 2, 3))
  mirrored = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert np.mean(mirrored & ~same) == pytest.approx(0.5, abs=0.1)


def test_training_view_defaults_to_random_resized_crops_from_the_load_size():
  config = test_config("tiny").train
  assert config.crop == "random_resized"
  assert tuple(config.crop_scale) == augment.DEFAULT_SCALE
  assert tuple(config.crop_ratio) == augment.DEFAULT_RATIO
  x = jnp.asarray(np.stack([china_plus_one()[:256, :256]] * 4) / 256.0)
  out = np.asarray(augment.training_view(jax.random.key(0), x, 224, config))
  assert out.shape == (4, 224, 224, 3)
  assert out.min() >= 1 / 256 - 1e-6  # no zero padding in the view


def test_pad_crop_view_pads_by_crop_pad():
  config = test_config("tiny", **{"train.crop": "pad", "train.crop_pad": 2}).train
  x = fashion_mnist_images(64) + 0.1  # no zero pixel of its own
  out = np.asarray(augment.training_view(jax.random.key(1), jnp.asarray(x), 28, config))
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for i in range(len(x)):
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               for view in (padded[i], padded[i][:, ::-1])
               if np.allclose(out[i], view[dy:dy + 28, dx:dx + 28])]
    assert matches, f"image {i} is not a crop of the 2-px zero-padded image"
    offsets.update(matches)
  assert len(offsets) > 10  # offsets spread over the 5×5 positions
  assert (out == 0).any()   # the zero padding does enter the view


def test_pad_crop_takes_the_centre_view_first():
  config = test_config("tiny", **{"train.crop": "pad", "train.crop_pad": 0}).train
  x = jnp.asarray(china_plus_one()[None, :40, :40])
  out = np.asarray(augment.training_view(jax.random.key(0), x, 32, config))
  centre = np.asarray(augment.center_crop(x, 32))
  assert np.array_equal(out, centre) or np.array_equal(out, centre[:, :, ::-1])
  np.testing.assert_array_equal(centre, np.asarray(x)[:, 4:36, 4:36])


def test_unknown_crop_and_oversized_centre_crop_are_refused():
  config = test_config("tiny", **{"train.crop": "mirror"}).train
  with pytest.raises(ValueError, match="train.crop must be one of"):
    augment.training_view(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), 28, config)
  with pytest.raises(ValueError, match="load_size"):
    augment.center_crop(jnp.zeros((1, 28, 28, 1)), 32)
