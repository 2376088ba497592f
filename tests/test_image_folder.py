"""Uncurated image folders: real photos (scikit-learn's china.jpg, flower.jpg) and broken files."""
from __future__ import annotations

import io
import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from conftest import data_config
from deeper_jax.data import ImageFolderSource, build_datasets
from deeper_jax.errors import DatasetNotFoundError

SIZE = 32


@pytest.fixture(scope="module")
def photos():
  china, flower = load_sample_images().images  # uint8 [427, 640, 3] each
  return {"china": china, "flower": flower}


def jpeg_bytes(array, **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "JPEG", quality=90, **kwargs)
  return buffer.getvalue()


def expected_view(array, size=SIZE):
  """The central square, resized to `size`: the geometry the source promises."""
  height, width = array.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  box = (left, top, left + side, top + side)
  return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR, box=box))


def torchvision_view(array, size=SIZE):
  """Resize(size) then CenterCrop(size): resize the whole image first (what the paper does)."""
  image = Image.fromarray(array)
  width, height = image.size
  scale = size / min(width, height)
  new = (max(size, round(width * scale)), max(size, round(height * scale)))
  image = image.resize(new, Image.Resampling.BILINEAR)
  left, top = (new[0] - size) // 2, (new[1] - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


@pytest.fixture
def tree(tmp_path, photos):
  """Two class folders of real photos, plus broken, hidden, loose and non-image files."""
  root = tmp_path / "photos"
  (root / "a" / "nested").mkdir(parents=True)
  (root / "b").mkdir()
  (root / ".cache").mkdir()
  china, flower = photos["china"], photos["flower"]
  (root / "a" / "china.jpg").write_bytes(jpeg_bytes(china))
  Image.fromarray(china[::2, ::2]).save(root / "a" / "nested" / "china_half.png")
  (root / "a" / "truncated.jpg").write_bytes(jpeg_bytes(flower)[:20000])  # header ok, data cut
  (root / "b" / "flower.JPG").write_bytes(jpeg_bytes(flower))
  Image.fromarray(flower).convert("L").save(root / "b" / "flower_gray.png")
  Image.fromarray(flower).convert("P").save(root / "b" / "flower_palette.gif")
  (root / "b" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
  (root / "b" / "notes.jpg").write_text("this is not an image\n")
  (root / "b" / "empty.png").write_bytes(b"")
  (root / "b" / "readme.txt").write_text("ignored: not an image extension")
  (root / ".cache" / "thumb.jpg").write_bytes(jpeg_bytes(china[:50, :50]))  # hidden: ignored
  (root / "loose.png").write_bytes((root / "a" / "nested" / "china_half.png").read_bytes())
  return root


def names(source):
  return [os.path.relpath(p, source.root) for p in source.paths]


def test_scan_is_sorted_recursive_and_skips_non_images(tree):
  source = ImageFolderSource(str(tree), SIZE)
  assert names(source) == ["a/china.jpg", "a/nested/china_half.png", "a/truncated.jpg",
                           "b/flower.JPG", "b/flower_gray.png", "b/flower_palette.gif", "loose.png"]
  skipped = {os.path.basename(path): reason for path, reason in source.skipped}
  assert set(skipped) == {"random.jpg", "notes.jpg", "empty.png"}
  assert skipped["empty.png"] == "empty file"
  assert "UnidentifiedImageError" in skipped["notes.jpg"]
  assert source.num_ignored == 1  # readme.txt; the hidden folder is not even counted
  assert source.labels is None and source.num_classes is None
  assert len(source) == 7 and source.image_shape == (SIZE, SIZE, 3)


def test_decoded_photos_are_resized_and_centre_cropped(tree, photos):
  source = ImageFolderSource(str(tree), SIZE)
  batch = source.images(np.arange(len(source)))
  assert batch.shape == (7, SIZE, SIZE, 3) and batch.dtype == np.uint8
  # PNG is lossless: exact match with the promised geometry ...
  half = photos["china"][::2, ::2]
  np.testing.assert_array_equal(batch[1], expected_view(half))
  # ... which is torchvision's Resize + CenterCrop up to a sub-pixel shift.
  assert np.abs(batch[1].astype(int) - torchvision_view(half)).mean() < 1
  # JPEG (decoded in draft mode): close to the same view of the original pixels.
  assert np.abs(batch[0].astype(int) - expected_view(photos["china"])).mean() < 8
  assert np.abs(batch[3].astype(int) - expected_view(photos["flower"])).mean() < 8
  # Grayscale and palette files come out as RGB too; the two photos are told apart.
  gray = batch[4]
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
  assert np.abs(batch[5].astype(int) - batch[3]).mean() < 25
  assert np.abs(batch[0].astype(int) - batch[3]).mean() > 20


def test_grayscale_channels(tree, photos):
  source = ImageFolderSource(str(tree), SIZE, channels=1)
  image = source.images(np.array([1]))[0]
  assert image.shape == (SIZE, SIZE, 1)
  luminance = np.asarray(Image.fromarray(expected_view(photos["china"][::2, ::2])).convert("L"))
  assert np.abs(image[..., 0].astype(int) - luminance).mean() < 3
  with pytest.raises(ValueError, match="channels must be 1"):
    ImageFolderSource(str(tree), SIZE, channels=4)


def test_truncated_jpeg_is_replaced_deterministically_and_counted(tree, caplog):
  source = ImageFolderSource(str(tree), SIZE)
  truncated = names(source).index("a/truncated.jpg")
  assert source.num_read_failures == 0
  with caplog.at_level(logging.WARNING):
    batch = source.images(np.array([truncated, 0]))
  assert source.num_read_failures == 1 and len(source.skipped) == 4
  assert source.skipped[-1][0].endswith("truncated.jpg")
  assert "decode failed at read time" in source.skipped[-1][1]
  assert any("truncated.jpg" in record.getMessage() for record in caplog.records)
  # Replaced by the next decodable image in folder order (b/flower.JPG, wrapping not needed).
  np.testing.assert_array_equal(batch[0], source.images(np.array([truncated + 1]))[0])
  # Same answer again, and from a fresh source (another host), failure counted once.
  np.testing.assert_array_equal(source.images(np.array([truncated]))[0], batch[0])
  assert source.num_read_failures == 1
  fresh = ImageFolderSource(str(tree), SIZE, num_threads=1)
  np.testing.assert_array_equal(fresh.images(np.array([truncated]))[0], batch[0])
  assert "1 at read" in source.report() and "3 at scan" in source.report()


def test_labels_from_subdirs(tree):
  source = ImageFolderSource(str(tree), SIZE, labels_from_subdirs=True)
  assert source.class_names == ("a", "b") and source.num_classes == 2
  np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1, 1])
  assert any(path.endswith("loose.png") and "class sub-folder" in reason
             for path, reason in source.skipped)
  # A broken image is replaced by one of its own class: the label stays right.
  truncated = names(source).index("a/truncated.jpg")
  replaced = source.images(np.array([truncated]))[0]
  np.testing.assert_array_equal(replaced, source.images(np.array([0]))[0])  # wraps to a/china.jpg
  sub = source.subset(np.array([4, 0]))
  np.testing.assert_array_equal(sub.labels, [1, 0])
  np.testing.assert_array_equal(sub.images(np.arange(2)), source.images(np.array([4, 0])))


def test_class_names_fix_the_mapping(tree):
  source = ImageFolderSource(str(tree), SIZE, labels_from_subdirs=True, class_names=["z", "b"])
  np.testing.assert_array_equal(source.labels, [1, 1, 1])
  assert source.num_classes == 2
  with pytest.raises(ValueError, match="labels_from_subdirs"):
    ImageFolderSource(str(tree), SIZE, class_names=["a"])


def test_without_header_checks_broken_files_fail_at_read_time(tree):
  source = ImageFolderSource(str(tree), SIZE, check_headers=False)
  assert len(source) == 10 and source.num_scan_skipped == 0
  batch = source.images(np.arange(len(source)))
  assert source.num_read_failures == 4  # truncated, empty, notes, random
  assert batch.shape == (10, SIZE, SIZE, 3)


def test_threads_do_not_change_results(tree):
  threaded = ImageFolderSource(str(tree), SIZE, num_threads=4)
  serial = ImageFolderSource(str(tree), SIZE, num_threads=1)
  order = np.array([6, 2, 0, 5, 2, 3])
  np.testing.assert_array_equal(threaded.images(order), serial.images(order))


def test_pickles_for_worker_processes(tree):
  source = ImageFolderSource(str(tree), SIZE)
  source.images(np.arange(3))  # starts the thread pool
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone.images(np.arange(3)), source.images(np.arange(3)))


def test_exif_orientation_is_applied(tmp_path, photos):
  china = photos["china"]
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90° clockwise to display"
  (tmp_path / "rotated.jpg").write_bytes(jpeg_bytes(china, exif=exif.tobytes()))
  image = ImageFolderSource(str(tmp_path), SIZE).images(np.array([0]))[0]
  upright = expected_view(np.ascontiguousarray(np.rot90(china, k=-1)))
  assert np.abs(image.astype(int) - upright).mean() < 8
  assert np.abs(image.astype(int) - expected_view(china)).mean() > 15


def test_empty_or_all_broken_folder_is_a_clear_error(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="no readable images"):
    ImageFolderSource(str(tmp_path), SIZE)
  (tmp_path / "x.jpg").write_text("not an image")
  with pytest.raises(DatasetNotFoundError, match="1 skipped"):
    ImageFolderSource(str(tmp_path), SIZE)
  with pytest.raises(DatasetNotFoundError, match="config.data.data_dir"):
    ImageFolderSource(str(tmp_path / "missing"), SIZE)


def test_skipped_files_are_reported_in_the_log(tree, caplog):
  with caplog.at_level(logging.INFO):
    source = ImageFolderSource(str(tree), SIZE)
  lines = [r.getMessage() for r in caplog.records if "ImageFolderSource" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0]
  assert "7 usable images" in lines[0] and "3 skipped" in lines[0]
  assert lines[0] == source.report()


def test_registry_image_folder_with_eval_dir(tree, tmp_path, photos):
  eval_dir = tmp_path / "eval"
  for split, photo_slice in (("train", slice(0, 200)), ("test", slice(200, 427))):
    for name, photo in photos.items():
      (eval_dir / split / name).mkdir(parents=True)
      Image.fromarray(photo[photo_slice]).save(eval_dir / split / name / "0.png")
  config = data_config(name="image_folder", data_dir=str(tree), eval_dir=str(eval_dir),
                       image_size=SIZE, max_train_images=5)
  datasets = build_datasets(config)
  assert len(datasets.train) == 5 and datasets.train.labels is None
  assert datasets.labelled_train.class_names == ("china", "flower")
  np.testing.assert_array_equal(datasets.test.labels, [0, 1])
  config.eval_dir = str(tmp_path / "nowhere")
  with pytest.raises(DatasetNotFoundError, match="config.data.eval_dir"):
    build_datasets(config)
  config.eval_dir = ""
  assert build_datasets(config).test is None
  # Images are decoded at data.load_size, in data.channels.
  config.load_size, config.channels = SIZE + 8, 1
  train = build_datasets(config).train
  assert train.image_shape == (SIZE + 8, SIZE + 8, 1)
  assert train.images(np.arange(2)).shape == (2, SIZE + 8, SIZE + 8, 1)
