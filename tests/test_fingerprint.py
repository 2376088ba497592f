"""The training-set fingerprint: a resume on other images (or the same in another order) is caught.

Folder identities come from the file system (relative path, size, mtime), array
identities from the pixels; both on real images (scikit-learn's sample photos,
Fashion-MNIST).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from deeper_jax.data import ArraySource, ImageFolderSource, SubsetSource, resized
from deeper_jax.data.fingerprint import fingerprint, item_ids

SIZE = 16


@pytest.fixture
def folder(tmp_path):
  """Four real photo crops in two sub-folders."""
  china, flower = load_sample_images().images
  root = tmp_path / "photos"
  for sub in ("a", "b"):
    (root / sub).mkdir(parents=True)
  crops = {"a/china_0.png": china[:64, :64], "a/china_1.png": china[100:164, 200:264],
           "b/flower_0.png": flower[:64, :64], "b/flower_1.png": flower[150:214, 300:364]}
  for name, crop in crops.items():
    Image.fromarray(crop).save(root / name)
  return root


def folder_ids(root):
  return item_ids(ImageFolderSource(str(root), SIZE))


def test_folder_ids_are_relative_path_size_and_mtime(folder):
  ids = folder_ids(folder)
  expected = []
  for name in ("a/china_0.png", "a/china_1.png", "b/flower_0.png", "b/flower_1.png"):
    stat = os.stat(folder / name)
    expected.append(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}")
  assert ids == expected


def test_touching_a_file_changes_its_id_and_the_fingerprint(folder):
  before = folder_ids(folder)
  stat = os.stat(folder / "a/china_1.png")
  os.utime(folder / "a/china_1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  after = folder_ids(folder)
  assert after[1] != before[1] and after[0] == before[0] and after[2:] == before[2:]
  assert fingerprint(after) != fingerprint(before)


def test_rewriting_a_file_changes_its_id(folder):
  before = folder_ids(folder)
  path = folder / "b/flower_0.png"
  old_mtime = os.stat(path).st_mtime_ns
  china = load_sample_images().images[0]
  Image.fromarray(china[:64, :64]).save(path)  # other pixels, same name
  os.utime(path, ns=(old_mtime, old_mtime))  # even with the old mtime kept (rsync -t)
  after = folder_ids(folder)
  assert after[2] != before[2] and fingerprint(after) != fingerprint(before)


def test_moving_the_whole_folder_keeps_the_fingerprint(folder, tmp_path):
  before = folder_ids(folder)
  moved = tmp_path / "elsewhere" / "photos_moved"
  moved.parent.mkdir()
  shutil.move(str(folder), str(moved))
  assert folder_ids(moved) == before
  assert fingerprint(folder_ids(moved)) == fingerprint(before)


def test_adding_a_file_changes_the_fingerprint(folder):
  before = fingerprint(folder_ids(folder))
  shutil.copy(folder / "a/china_0.png", folder / "a/china_2.png")
  assert fingerprint(folder_ids(folder)) != before


def test_subset_of_a_folder_gives_the_subset_ids_in_order(folder):
  source = ImageFolderSource(str(folder), SIZE)
  ids = item_ids(source)
  assert item_ids(source.subset(np.array([3, 0, 2]))) == [ids[3], ids[0], ids[2]]
  nested = SubsetSource(SubsetSource(source, np.array([1, 2, 3])), np.array([2, 0]))
  assert item_ids(nested) == [ids[3], ids[1]]
  assert item_ids(resized(source.subset(np.array([1])), 2 * SIZE)) == [ids[1]]


def test_order_matters():
  ids = ["a.png\t1\t1", "b.png\t1\t1", "c.png\t1\t1"]
  assert fingerprint(ids) == fingerprint(list(ids))
  assert fingerprint(ids[::-1]) != fingerprint(ids)
  assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])  # boundaries count


def test_array_ids_hash_pixels(fmnist_test):
  images = np.array(fmnist_test.images(np.arange(50)))
  source = ArraySource(images, fmnist_test.labels[:50])
  ids = item_ids(source)
  assert len(ids) == 50 and len(set(ids)) == 50
  assert item_ids(ArraySource(images.copy())) == ids  # pixels, not labels or object identity
  changed = images.copy()
  changed[17, 5, 9, 0] ^= 1  # one pixel, one bit
  changed_ids = item_ids(ArraySource(changed))
  assert changed_ids[17] != ids[17] and changed_ids[:17] == ids[:17]
  assert fingerprint(changed_ids) != fingerprint(ids)
  assert item_ids(source.subset(np.array([4, 2]))) == [ids[4], ids[2]]
  # A resized view has the identities of the images it shows.
  assert item_ids(resized(source, 32)) == ids


def test_long_tailed_fashion_mnist_fingerprint_depends_on_which_images(fmnist_train):
  from deeper_jax.data import long_tail_indices
  a = fmnist_train.subset(long_tail_indices(fmnist_train.labels, 10.0, seed=0)[:3000])
  b = fmnist_train.subset(long_tail_indices(fmnist_train.labels, 10.0, seed=1)[:3000])
  assert fingerprint(item_ids(a)) == fingerprint(item_ids(a))
  assert fingerprint(item_ids(a)) != fingerprint(item_ids(b))


def test_undecodable_file_names_give_storable_ids(folder):
  name = os.fsdecode(b"caf\xe9\tphoto.png")  # Latin-1 bytes and a tab in a file name
  shutil.copy(folder / "a/china_0.png", os.path.join(str(folder / "b"), name))
  ids = folder_ids(folder)
  assert len(ids) == 5
  weird = ids[2]  # 'b/caf...' sorts before 'b/flower_0.png'
  assert weird.startswith("b/caf\\xe9\\tphoto.png\t")
  assert weird.count("\t") == 2  # the name's tab cannot be mistaken for a separator
  assert all(i.encode("utf-8") for i in ids)  # storable as UTF-8 text (train_set.txt)
  assert len(fingerprint(ids)) == 64
