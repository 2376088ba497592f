"""Sources, Fashion-MNIST, long tail and digits, on real images.

tfds and the registry: test_data_registry.py; image folders: test_image_folder*.py.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from PIL import Image

from deeper_jax.data import fashion_mnist
from deeper_jax.data import (ArraySource, ResizedSource, Source, SubsetSource, load_digits,
                             load_fashion_mnist, long_tail_indices, long_tail_sizes, random_subset,
                             read_all, read_idx, resized)
from deeper_jax.errors import DataError, DatasetNotFoundError, UserError


# --- ArraySource & views -------------------------------------------------------

class TestArraySource:

  def test_reads_requested_images_and_keeps_labels(self, fmnist_test):
    images = fmnist_test.array[:50]
    source = ArraySource(images, fmnist_test.labels[:50])
    got = source.images(np.array([7, 0, 7]))
    assert got.dtype == np.uint8 and got.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(got[0], images[7])
    np.testing.assert_array_equal(got[1], images[0])
    np.testing.assert_array_equal(source[3], images[3])
    assert len(source) == 50 and source.image_shape == (28, 28, 1)
    assert source.labels.dtype == np.int32
    assert source.num_classes == int(fmnist_test.labels[:50].max()) + 1
    assert isinstance(source, Source)

  def test_unlabelled(self):
    source = ArraySource(np.zeros((4, 8, 8, 3), np.uint8))
    assert source.labels is None and source.num_classes is None
    assert source.subset(np.array([1, 2])).labels is None

  def test_subset_keeps_labels_and_class_count(self, fmnist_test):
    source = ArraySource(fmnist_test.array[:100], fmnist_test.labels[:100], num_classes=10)
    sub = source.subset(np.array([5, 2, 99]))
    np.testing.assert_array_equal(sub.labels, fmnist_test.labels[[5, 2, 99]])
    np.testing.assert_array_equal(sub.images(np.arange(3)), fmnist_test.array[[5, 2, 99]])
    assert sub.num_classes == 10

  def test_empty_index_list_gives_empty_batch(self, fmnist_test):
    assert fmnist_test.images(np.array([], np.int64)).shape == (0, 28, 28, 1)

  @pytest.mark.parametrize("images, match", [
      (np.zeros((2, 8, 8, 1), np.float32), "uint8"),
      (np.zeros((2, 8, 8), np.uint8), "4-D"),
      (np.zeros((2, 8, 8, 2), np.uint8), "1 or 3 channels"),
  ])
  def test_rejects_bad_images(self, images, match):
    with pytest.raises(ValueError, match=match):
      ArraySource(images)

  def test_rejects_bad_labels(self):
    images = np.zeros((3, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
      ArraySource(images, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="non-negative"):  # -1 alone means "no label"
      ArraySource(images, np.array([0, -2, 2]))
    with pytest.raises(ValueError, match="integers"):
      ArraySource(images, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="num_classes=2"):
      ArraySource(images, np.array([0, 1, 2]), num_classes=2)

  def test_rejects_bad_indices(self, fmnist_test):
    with pytest.raises(IndexError, match=r"\[0, 10000\)"):
      fmnist_test.images(np.array([0, 10000]))
    with pytest.raises(IndexError):
      fmnist_test.images(np.array([-1]))
    with pytest.raises(ValueError, match="1-D"):
      fmnist_test.images(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="integers"):
      fmnist_test.images(np.array([0.5]))

  def test_subset_source_composes(self, fmnist_test):
    view = SubsetSource(fmnist_test, np.array([10, 20, 30, 40]))
    inner = view.subset(np.array([3, 1]))
    np.testing.assert_array_equal(inner.images(np.arange(2)), fmnist_test.array[[40, 20]])
    np.testing.assert_array_equal(inner.labels, fmnist_test.labels[[40, 20]])
    assert inner.num_classes == 10 and inner.image_shape == (28, 28, 1)

  def test_resized_source_upsamples_real_images(self, fmnist_test):
    view = resized(fmnist_test, 32)
    assert isinstance(view, ResizedSource) and view.image_shape == (32, 32, 1)
    batch = view.images(np.array([0, 1]))
    assert batch.shape == (2, 32, 32, 1) and batch.dtype == np.uint8
    # Upsampling keeps the picture: same mean brightness, and it matches PIL's own resize.
    original = fmnist_test.array[0, :, :, 0]
    assert abs(batch[0].mean() - original.mean()) < 3.0
    expected = np.asarray(Image.fromarray(original).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(batch[0, :, :, 0], expected)
    np.testing.assert_array_equal(view.labels, fmnist_test.labels)
    assert view.subset(np.array([1])).images(np.array([0])).shape == (1, 32, 32, 1)
    assert resized(fmnist_test, 28) is fmnist_test

  def test_random_subset_is_seeded_sorted_and_zero_means_all(self, fmnist_test):
    a = random_subset(fmnist_test, 100, seed=3)
    b = random_subset(fmnist_test, 100, seed=3)
    c = random_subset(fmnist_test, 100, seed=4)
    assert len(a) == 100
    np.testing.assert_array_equal(a.images(np.arange(100)), b.images(np.arange(100)))
    assert not np.array_equal(a.labels, c.labels) or not np.array_equal(
        a.images(np.arange(100)), c.images(np.arange(100)))
    assert random_subset(fmnist_test, 0, seed=0) is fmnist_test
    with pytest.raises(ValueError, match=">= 0"):
      random_subset(fmnist_test, -1, seed=0)

  def test_read_all_in_batches(self, fmnist_test):
    sub = fmnist_test.subset(np.arange(25))
    np.testing.assert_array_equal(read_all(sub, batch_size=7), fmnist_test.array[:25])


# --- Fashion-MNIST -----------------------------------------------------------------

def write_idx(path, array, gz=False, magic=None):
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) if magic is None else magic
  header += np.asarray(array.shape, ">u4").tobytes()
  data = header + array.tobytes()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(data)


class TestFashionMnist:

  def test_real_splits(self, fmnist_train, fmnist_test):
    assert len(fmnist_train) == 60000 and len(fmnist_test) == 10000
    assert fmnist_train.image_shape == (28, 28, 1) and fmnist_train.num_classes == 10
    np.testing.assert_array_equal(np.bincount(fmnist_train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fmnist_test.labels), [1000] * 10)
    # Known statistic of Fashion-MNIST train: mean pixel 0.2860 * 255.
    assert abs(fmnist_train.array.mean() - 0.2860 * 255) < 0.1
    # Class 1 (trousers) images are much narrower than class 8 (bags).
    trousers = fmnist_train.array[fmnist_train.labels == 1][:500]
    bags = fmnist_train.array[fmnist_train.labels == 8][:500]
    assert (trousers > 30).mean() < (bags > 30).mean()

  def test_cached_and_read_only(self, fmnist_train):
    again = load_fashion_mnist("train")
    assert again.array is fmnist_train.array
    with pytest.raises(ValueError):
      again.array[0, 0, 0, 0] = 1

  @pytest.mark.parametrize("gz", [False, True])
  def test_reads_idx_files_from_data_dir(self, tmp_path, fmnist_test, gz):
    images, labels = fmnist_test.array[:64, :, :, 0], fmnist_test.labels[:64]
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    source = load_fashion_mnist("test", str(tmp_path))
    assert len(source) == 64
    np.testing.assert_array_equal(source.array[..., 0], images)
    np.testing.assert_array_equal(source.labels, labels)

  def test_read_idx_rejects_bad_magic_and_truncation(self, tmp_path, fmnist_test):
    bad = tmp_path / "bad-magic"
    write_idx(bad, fmnist_test.array[:2, :, :, 0], magic=bytes([1, 2, 8, 3]))
    with pytest.raises(ValueError, match="not an IDX file"):
      read_idx(str(bad))
    full = tmp_path / "full"
    write_idx(full, fmnist_test.array[:4, :, :, 0])
    cut = tmp_path / "cut"
    cut.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
      read_idx(str(cut))
    corrupt_gz = tmp_path / "corrupt.gz"
    corrupt_gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="could not read IDX"):
      read_idx(str(corrupt_gz))

  def test_rejects_mismatched_image_and_label_files(self, tmp_path, fmnist_test):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", fmnist_test.array[:10, :, :, 0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", fmnist_test.labels[:9])
    with pytest.raises(ValueError, match="expected 10 uint8 labels"):
      load_fashion_mnist("test", str(tmp_path))

  def test_missing_files_raise_dataset_not_found(self, tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
      load_fashion_mnist("train", str(tmp_path))
    message = str(info.value)
    # A user error (main prints it as one line), and still a FileNotFoundError for callers.
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    assert isinstance(info.value, UserError)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--config.data.data_dir" in message and "--config.data.download=true" in message
    assert not any(tmp_path.iterdir()), "nothing may be downloaded or created"

  def test_default_dirs_are_named_when_missing(self, tmp_path, monkeypatch):
    tfds_default = os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    if os.path.isdir(os.path.join(tfds_default, "fashion_mnist")):
      pytest.skip("a tfds fashion_mnist is prepared on this machine")
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
      load_fashion_mnist("test")

  def test_bad_split_and_data_dir(self, tmp_path):
    with pytest.raises(ValueError, match="'train' or 'test'"):
      load_fashion_mnist("validation")
    with pytest.raises(DatasetNotFoundError, match="config.data.data_dir"):
      load_fashion_mnist("train", str(tmp_path / "missing"))


# --- long tail ---------------------------------------------------------------------

class TestLongTail:

  def test_sizes_fall_geometrically_from_head_to_tail(self, fmnist_train):
    keep = long_tail_indices(fmnist_train.labels, imbalance_ratio=10.0, seed=0)
    counts = np.bincount(fmnist_train.labels[keep], minlength=10)
    assert counts[0] == 6000 and counts[-1] == 600
    assert np.all(np.diff(counts) < 0)
    ratios = counts[1:] / counts[:-1]
    np.testing.assert_allclose(ratios, 10 ** (-1 / 9), atol=2e-3)
    assert np.all(np.diff(keep) > 0), "sorted, no duplicates"

  def test_seed_changes_images_not_sizes(self, fmnist_train):
    a = long_tail_indices(fmnist_train.labels, 10.0, seed=0)
    b = long_tail_indices(fmnist_train.labels, 10.0, seed=0)
    c = long_tail_indices(fmnist_train.labels, 10.0, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) and not np.array_equal(a, c)
    np.testing.assert_array_equal(np.bincount(fmnist_train.labels[a]),
                                  np.bincount(fmnist_train.labels[c]))

  def test_kept_images_are_spread_over_the_class(self, fmnist_train):
    keep = long_tail_indices(fmnist_train.labels, 10.0, seed=0)
    tail = np.flatnonzero(fmnist_train.labels == 9)
    rank = np.searchsorted(tail, keep[fmnist_train.labels[keep] == 9])
    # A uniform 600-of-6000 subset: mean rank near the middle, not the first 600.
    assert abs(rank.mean() - 3000) < 300 and rank.max() > 5000

  def test_ratio_one_keeps_everything_and_class_order_picks_the_head(self, fmnist_train):
    assert len(long_tail_indices(fmnist_train.labels, 1.0)) == 60000
    keep = long_tail_indices(fmnist_train.labels, 10.0, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    counts = np.bincount(fmnist_train.labels[keep], minlength=10)
    assert counts[9] == 6000 and counts[0] == 600

  def test_sizes_capped_by_available_images(self):
    np.testing.assert_array_equal(long_tail_sizes([100, 5, 50], 4.0), [100, 5, 25])

  def test_bad_arguments(self, fmnist_train):
    with pytest.raises(ValueError, match="imbalance_ratio"):
      long_tail_indices(fmnist_train.labels, 0.5)
    with pytest.raises(ValueError, match="class_order"):
      long_tail_indices(fmnist_train.labels, 10.0, class_order=[0, 11])
    with pytest.raises(ValueError, match="1-D integer"):
      long_tail_indices(np.zeros((2, 2), np.int32))


# --- digits ------------------------------------------------------------------------

class TestDigits:

  def test_stratified_fixed_split(self):
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 355
    train_share = np.bincount(train.labels) / len(train)
    test_share = np.bincount(test.labels) / len(test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)

  def test_native_and_upsampled(self):
    native = load_digits("all", image_size=8)
    assert native.image_shape == (8, 8, 1) and native.array.max() == 255
    from sklearn.datasets import load_digits as sk_digits
    np.testing.assert_array_equal(native.array[..., 0],
                                  np.round(sk_digits().images * 255 / 16).astype(np.uint8))
    big = load_digits("test", image_size=28)
    assert big.image_shape == (28, 28, 1)
    # Upsampled digits keep their ink: mean brightness within a few grey levels.
    small = load_digits("test", image_size=8)
    assert abs(big.array.mean() - small.array.mean()) < 6
    with pytest.raises(ValueError, match="'train', 'test' or 'all'"):
      load_digits("val")
