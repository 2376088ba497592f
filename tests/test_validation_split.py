"""``data.validation_size``: hyper-parameters are chosen on held-out train images, never on
the test split, and no validation image is ever trained on.

Pixel hashes identify images: Fashion-MNIST holds no two identical images (the
first test checks it), so a shared hash is a shared image.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import data_config, test_config
from deeper_jax.data import build_datasets, read_all, registry, validation
from deeper_jax.data import uncurated as U
from deeper_jax.errors import ConfigError

FASHION = ("fashion_mnist", "fashion_mnist_longtail", "fashion_mnist_uncurated")
SIZE = 1000


def _hashes(source) -> list[str]:
  return [hashlib.sha1(image.tobytes()).hexdigest() for image in read_all(source)]


@pytest.fixture(scope="module")
def built():
  """(name -> Datasets with a 1000-image validation split, the splits the registry read).

  While they are built, reading the Fashion-MNIST test split raises.
  """
  read = []
  original = registry.load_fashion_mnist

  def load(split, *args, **kwargs):
    read.append(split)
    if split == "test":
      raise AssertionError("the test split was read although validation_size > 0")
    return original(split, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(registry, "load_fashion_mnist", load)
    datasets = {name: build_datasets(data_config(name=name, validation_size=SIZE))
                for name in FASHION}
  return datasets, read


@pytest.fixture(scope="module")
def with_validation(built):
  return built[0]


@pytest.fixture(scope="module")
def held_out(fmnist_train):
  """The indices (in the 60k train split) that the registry holds out for seed 0."""
  return validation.stratified_indices(fmnist_train.labels, SIZE, seed=0)


def test_fashion_mnist_train_has_no_identical_images(fmnist_train):
  assert len(set(_hashes(fmnist_train))) == len(fmnist_train)


@pytest.mark.parametrize("name", FASHION)
def test_validation_is_the_test_source_and_the_test_split_is_never_read(built, name):
  datasets, read = built
  test = datasets[name].test
  assert len(test) == SIZE and test.image_shape == (28, 28, 1)
  assert test.num_classes == 10
  assert read == ["train"] * len(FASHION)


@pytest.mark.parametrize("name", FASHION)
def test_validation_is_disjoint_from_everything_trained_on(with_validation, name):
  datasets = with_validation[name]
  val = set(_hashes(datasets.test))
  assert len(val) == SIZE
  assert not val & set(_hashes(datasets.labelled_train)), "probes never fit on it"
  assert not val & set(_hashes(datasets.train)), "pre-training never sees it"
  assert len(datasets.labelled_train) == 60000 - SIZE


def test_validation_images_are_train_images_held_out_by_the_seeded_split(
    with_validation, held_out, fmnist_train):
  datasets = with_validation["fashion_mnist"]
  np.testing.assert_array_equal(read_all(datasets.test), fmnist_train.array[held_out])
  np.testing.assert_array_equal(datasets.test.labels, fmnist_train.labels[held_out])
  assert len(datasets.train) == 60000 - SIZE


def test_uncurated_duplicates_never_copy_a_validation_image(with_validation, held_out):
  train = with_validation["fashion_mnist_uncurated"].train
  assert not set(train.origin[train.origin >= 0]) & set(held_out)
  assert (train.kinds == U.DUPLICATE).sum() > 0 and (train.labels == -1).sum() > 0


def test_longtail_is_drawn_from_the_remaining_images(with_validation, fmnist_train, held_out):
  counts = np.bincount(with_validation["fashion_mnist_longtail"].train.labels, minlength=10)
  head = 6000 - np.sum(fmnist_train.labels[held_out] == 0)
  assert counts[0] == head and counts[9] == round(head / 10)


def test_stratified_per_class_counts_within_one(fmnist_train, held_out):
  np.testing.assert_array_equal(np.bincount(fmnist_train.labels[held_out], minlength=10),
                                [SIZE // 10] * 10)
  for size in (7, 1005, 2999):
    chosen = validation.stratified_indices(fmnist_train.labels, size, seed=3)
    counts = np.bincount(fmnist_train.labels[chosen], minlength=10)
    assert len(chosen) == size == counts.sum() and len(np.unique(chosen)) == size
    assert counts.max() - counts.min() <= 1


def test_stratified_follows_class_shares_and_skips_unlabelled():
  labels = np.repeat([0, 1, 2, -1], [600, 300, 100, 500])
  chosen = validation.stratified_indices(labels, 100, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[chosen]), [60, 30, 10])


def test_seeded(fmnist_train, held_out):
  same = validation.stratified_indices(fmnist_train.labels, SIZE, seed=0)
  other = validation.stratified_indices(fmnist_train.labels, SIZE, seed=1)
  np.testing.assert_array_equal(same, held_out)
  assert len(np.intersect1d(other, held_out)) < SIZE // 2


def test_off_by_default_reads_the_test_split(fmnist_test):
  assert test_config("default").data.validation_size == 0
  datasets = build_datasets(data_config(name="fashion_mnist", max_eval_images=0))
  assert len(datasets.test) == 10000 and len(datasets.labelled_train) == 60000
  np.testing.assert_array_equal(datasets.test.images(np.arange(3)), fmnist_test.array[:3])


def test_other_datasets_refuse_it():
  with pytest.raises(ConfigError, match="only for the Fashion-MNIST datasets"):
    build_datasets(data_config(name="digits", validation_size=100))


def test_bad_sizes_are_config_errors():
  with pytest.raises(ConfigError, match="more than half"):
    build_datasets(data_config(name="fashion_mnist", validation_size=30001))
  with pytest.raises(ConfigError, match="config.data.validation_size=-1"):
    build_datasets(data_config(validation_size=-1))
  from deeper_jax.config_checks import check_fields
  with pytest.raises(ConfigError, match="config.data.validation_size=-1"):
    check_fields(test_config("default", **{"data.validation_size": -1}))
