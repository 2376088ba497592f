"""'fashion_mnist_uncurated': the long tail plus near-duplicates and unlabelled clutter.

The full default set (≈35k images) is built once per module; determinism and the
generators run at reduced size.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import data_config, test_config
from deeper_jax.data import (ArraySource, build_datasets, load_digits, long_tail_indices,
                             random_subset, registry)
from deeper_jax.data import uncurated as U
from deeper_jax.data.fingerprint import fingerprint, item_ids
from deeper_jax.errors import ConfigError

CLUTTER = [U.KINDS.index(name) for name, _ in U.CLUTTER_MIX]
SHIFTS = [(dy, dx) for dy in range(-U.MAX_SHIFT, U.MAX_SHIFT + 1)
          for dx in range(-U.MAX_SHIFT, U.MAX_SHIFT + 1)]


def _hash(image: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _hashes(images) -> set[str]:
  return {_hash(image) for image in images}


def _neighbour_correlation(images: np.ndarray) -> np.ndarray:
  """Correlation of each image's horizontally adjacent pixels (≈1 smooth, ≈0 white noise)."""
  images = images.astype(np.float64)
  a = images[:, :, 1:].reshape(len(images), -1)
  b = images[:, :, :-1].reshape(len(images), -1)
  a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
  return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.fixture(scope="module")
def datasets():
  return build_datasets(data_config(name="fashion_mnist_uncurated"))


@pytest.fixture(scope="module")
def small_originals(fmnist_train):
  keep = long_tail_indices(fmnist_train.labels[:2000], 10.0, seed=0)
  return ArraySource(fmnist_train.array[keep], fmnist_train.labels[keep], 10)


class TestComposition:

  def test_duplicates_and_clutter_are_their_target_fractions(self, datasets):
    kinds = datasets.train.kinds
    assert abs(np.mean(kinds == U.DUPLICATE) - 0.1) <= 0.01
    assert abs(np.mean(np.isin(kinds, CLUTTER)) - 0.2) <= 0.01
    clutter = kinds[np.isin(kinds, CLUTTER)]
    for (name, share), kind in zip(U.CLUTTER_MIX, CLUTTER):
      assert abs(np.mean(clutter == kind) - share) <= 0.01, name

  def test_originals_are_the_longtailed_set_of_the_same_seed(self, datasets, fmnist_train):
    train = datasets.train
    originals = np.flatnonzero(train.kinds == U.ORIGINAL)
    expected = long_tail_indices(fmnist_train.labels, 10.0, seed=0)
    np.testing.assert_array_equal(np.sort(train.origin[originals]), expected)
    origin = train.origin[originals]
    np.testing.assert_array_equal(train.array[originals], fmnist_train.array[origin])
    np.testing.assert_array_equal(train.labels[originals], fmnist_train.labels[origin])
    longtail = build_datasets(data_config(name="fashion_mnist_longtail")).train
    assert sorted(item_ids(train.subset(originals))) == sorted(item_ids(longtail))

  def test_shuffled_into_one_order(self, datasets):
    kinds = datasets.train.kinds
    thirds = np.array_split(kinds, 3)
    for part in thirds:  # every kind spread over the whole set, not appended in blocks
      assert abs(np.mean(part == U.ORIGINAL) - np.mean(kinds == U.ORIGINAL)) < 0.03

  def test_labels_are_minus_one_exactly_on_clutter(self, datasets):
    train = datasets.train
    np.testing.assert_array_equal(train.labels == -1, np.isin(train.kinds, CLUTTER))
    assert train.labels.max() == 9 and train.num_classes == 10
    assert train.image_shape == (28, 28, 1) and train.array.dtype == np.uint8

  def test_labelled_train_and_test_are_the_balanced_splits(self, datasets, fmnist_test):
    np.testing.assert_array_equal(np.bincount(datasets.labelled_train.labels), [6000] * 10)
    assert len(datasets.test) == 10000
    np.testing.assert_array_equal(datasets.test.images(np.arange(5)), fmnist_test.array[:5])

  def test_duplicates_copy_a_few_sources_and_keep_their_labels(self, datasets, fmnist_train):
    train = datasets.train
    duplicates = np.flatnonzero(train.kinds == U.DUPLICATE)
    sources, copies = np.unique(train.origin[duplicates], return_counts=True)
    assert len(sources) == U.NUM_DUPLICATE_SOURCES and copies.max() - copies.min() <= 1
    assert set(sources) <= set(train.origin[train.kinds == U.ORIGINAL]), "copies of originals"
    np.testing.assert_array_equal(train.labels[duplicates],
                                  fmnist_train.labels[train.origin[duplicates]])

  def test_duplicates_are_close_to_their_source_but_not_identical(self, datasets, fmnist_train):
    """Once the shift and the brightness/contrast are undone, only JPEG noise is left."""
    train = datasets.train
    duplicates = np.flatnonzero(train.kinds == U.DUPLICATE)[:400]
    sources = np.unique(train.origin[train.kinds == U.DUPLICATE])
    # Every source at every shift, centred: [sources, shifts, pixels].
    bank = np.stack([[U.shift(fmnist_train.array[s, :, :, 0], dy, dx) for dy, dx in SHIFTS]
                     for s in sources]).reshape(len(sources), len(SHIFTS), -1).astype(np.float64)
    bank -= bank.mean(-1, keepdims=True)
    own_residuals, nearest_is_own = [], 0
    for i in duplicates:
      image = train.array[i, :, :, 0].astype(np.float64).reshape(-1)
      assert not np.array_equal(train.array[i], fmnist_train.array[train.origin[i]])
      image -= image.mean()
      gain = (bank * image).sum(-1) / (bank * bank).sum(-1)  # least-squares contrast
      residual = np.abs(image - gain[..., None] * bank).mean(-1).min(1)  # best shift
      own = np.searchsorted(sources, train.origin[i])
      own_residuals.append(residual[own])
      nearest_is_own += int(residual.argmin() == own)
    assert np.median(own_residuals) < 10 and max(own_residuals) < 20
    assert nearest_is_own >= 0.98 * len(duplicates)

  def test_clutter_is_no_fashion_mnist_image(self, datasets, fmnist_train, fmnist_test):
    train = datasets.train
    clutter = train.array[np.isin(train.kinds, CLUTTER)]
    fashion = _hashes(fmnist_train.array) | _hashes(fmnist_test.array)
    assert not _hashes(clutter) & fashion


class TestClutterGenerators:

  def test_blanks_are_constant_grey_levels(self):
    blanks = U.blank_images(300, np.random.default_rng(0))
    assert blanks.shape == (300, 28, 28) and blanks.dtype == np.uint8
    assert np.all(blanks.min(axis=(1, 2)) == blanks.max(axis=(1, 2)))
    assert len(np.unique(blanks[:, 0, 0])) > 100, "many different levels"

  def test_noise_is_high_variance_without_spatial_structure(self):
    noise = U.noise_images(400, np.random.default_rng(0))
    std = noise.reshape(400, -1).std(1)
    assert std.min() > 10 and np.median(std) > 40
    assert _neighbour_correlation(noise).max() < 0.9
    # Some are blurred (neighbours correlated), some are white noise.
    assert (_neighbour_correlation(noise) > 0.3).mean() > 0.3
    assert (np.abs(_neighbour_correlation(noise)) < 0.15).mean() > 0.3

  @pytest.mark.parametrize("generator", [U.photo_crops, U.graphic_crops])
  def test_photo_and_graphic_crops_show_structure(self, generator):
    crops = generator(200, np.random.default_rng(0))
    assert crops.shape == (200, 28, 28) and crops.dtype == np.uint8
    assert crops.reshape(200, -1).std(1).min() >= U.MIN_CROP_STD
    assert len(_hashes(crops)) == 200, "every crop a different view"
    # Photos are smooth at this scale, unlike noise.
    assert np.median(_neighbour_correlation(crops)) > 0.7

  def test_bundled_pictures_are_read(self):
    assert len(U.photos()) == 3 and len(U.graphics()) == 2
    assert all(p.mode == "L" and min(p.size) >= 128 for p in U.photos() + U.graphics())

  def test_digits_are_upsampled_sklearn_digits_some_inverted(self):
    digits = load_digits("all", 28).array[..., 0]
    out = U.digit_images(300, np.random.default_rng(0))
    plain, inverted = _hashes(digits), _hashes(255 - digits)
    is_plain = np.array([_hash(image) in plain for image in out])
    is_inverted = np.array([_hash(image) in inverted for image in out])
    assert np.all(is_plain | is_inverted)
    assert 0.35 < is_inverted.mean() < 0.65

  def test_clutter_counts_follow_the_mix_and_sum_up(self):
    for n in (0, 1, 7, 7007):
      counts = U.clutter_counts(n)
      assert sum(counts.values()) == n and list(counts) == [k for k, _ in U.CLUTTER_MIX]
      for name, share in U.CLUTTER_MIX:
        assert abs(counts[name] - share * n) < 1

  def test_shift_moves_content_and_fills_with_black(self, fmnist_train):
    image = fmnist_train.array[0, :, :, 0]
    moved = U.shift(image, 2, -1)
    np.testing.assert_array_equal(moved[2:, :-1], image[:-2, 1:])
    assert not moved[:2].any() and not moved[:, -1].any()
    np.testing.assert_array_equal(U.shift(image, 0, 0), image)


class TestDeterminism:

  def _make(self, originals, seed, **fractions):
    fractions = {"duplicate_fraction": 0.1, "clutter_fraction": 0.2, **fractions}
    return U.make_uncurated(originals, seed=seed, **fractions)

  def test_same_seed_same_bytes(self, small_originals):
    a, b = self._make(small_originals, 3), self._make(small_originals, 3)
    for field in ("array", "labels", "kinds", "origin"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))

  def test_different_seed_different_set(self, small_originals):
    a, b = self._make(small_originals, 3), self._make(small_originals, 4)
    assert len(a) == len(b)
    assert not np.array_equal(a.kinds, b.kinds), "another order"
    clutter = lambda s: _hashes(s.array[np.isin(s.kinds, CLUTTER)])
    assert len(clutter(a) & clutter(b)) < 0.1 * len(clutter(a)), "other clutter"
    dup_sources = lambda s: set(s.origin[s.kinds == U.DUPLICATE])
    assert dup_sources(a) != dup_sources(b), "other duplicated images"

  def test_fractions_at_other_settings(self, small_originals):
    source = self._make(small_originals, 0, duplicate_fraction=0.3, clutter_fraction=0.05)
    assert abs(np.mean(source.kinds == U.DUPLICATE) - 0.3) <= 0.01
    assert abs(np.mean(np.isin(source.kinds, CLUTTER)) - 0.05) <= 0.01
    none = self._make(small_originals, 0, duplicate_fraction=0.0, clutter_fraction=0.0)
    assert len(none) == len(small_originals) and np.all(none.kinds == U.ORIGINAL)
    with pytest.raises(ValueError, match="must be < 1"):
      self._make(small_originals, 0, duplicate_fraction=0.5, clutter_fraction=0.5)


class TestRegistry:

  def test_end_to_end_with_max_train_images_load_size_and_fingerprint(self, datasets):
    config = data_config(name="fashion_mnist_uncurated", max_train_images=1000, load_size=32)
    capped = build_datasets(config)
    assert len(capped.train) == 1000 and capped.train.image_shape == (32, 32, 1)
    assert capped.train.images(np.arange(4)).shape == (4, 32, 32, 1)
    assert registry.image_channels(config) == 1
    # The kinds and the identities see through the subset and resize views.
    kinds = U.kinds_of(capped.train)
    keep = random_subset(datasets.train, 1000, seed=0)
    np.testing.assert_array_equal(kinds, keep.kinds)
    assert set(U.kind_names(capped.train)) <= set(U.KINDS) and U.kinds_of(datasets.test) is None
    ids = item_ids(capped.train)
    assert ids == item_ids(keep) and len(ids) == 1000
    assert fingerprint(ids) == fingerprint(item_ids(build_datasets(config).train))
    config.seed = 1
    assert fingerprint(ids) != fingerprint(item_ids(build_datasets(config).train))

  def test_fractions_are_config_fields_checked_before_building(self):
    from deeper_jax.config_checks import check_fields
    check_fields(test_config("default", **{"data.name": "fashion_mnist_uncurated"}))
    for field, value in (("duplicate_fraction", 1.0), ("clutter_fraction", -0.1)):
      with pytest.raises(ConfigError, match=f"config.data.{field}="):
        check_fields(test_config("default", **{f"data.{field}": value}))
    with pytest.raises(ConfigError, match="duplicate_fraction . config.data.clutter_fraction"):
      build_datasets(data_config(name="fashion_mnist_uncurated", duplicate_fraction=0.5,
                                 clutter_fraction=0.5))


class TestUnlabelled:
  """-1 means "no label" everywhere in deeper_jax.data; nothing else below 0 is allowed."""

  def test_sources_accept_minus_one_and_count_only_real_classes(self, fmnist_test):
    labels = np.array([-1, 3, -1, 0])
    source = ArraySource(fmnist_test.array[:4], labels)
    assert source.num_classes == 4
    np.testing.assert_array_equal(source.subset(np.array([2, 1])).labels, [-1, 3])
    assert ArraySource(fmnist_test.array[:2], np.array([-1, -1])).num_classes == 0
    with pytest.raises(ValueError, match="-1 for an image"):
      ArraySource(fmnist_test.array[:2], np.array([-2, 1]))

  def test_long_tail_skips_unlabelled_images(self, fmnist_train):
    labels = np.array(fmnist_train.labels)
    labels[::7] = -1
    keep = long_tail_indices(labels, 10.0, seed=0)
    assert np.all(labels[keep] >= 0)
    counts = np.bincount(labels[keep], minlength=10)
    assert counts[0] == np.sum(labels == 0) and counts[0] / counts[9] == pytest.approx(10, rel=0.01)
    with pytest.raises(ValueError, match="class_order"):
      long_tail_indices(labels, 10.0, class_order=[-1, 0])
