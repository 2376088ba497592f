"""Packing an image folder into ArrayRecord shards, and reading it back (data.name='array_record').

The packed folder must be the image folder minus its broken files: every file that
decodes becomes one record, in folder order, and the ArrayRecord source gives the same
pixels as the folder source for the same images; every broken file is skipped, counted
and reported with its reason.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from conftest import REPO, data_config
from deeper_jax.data import ImageFolderSource, build_datasets, load_fashion_mnist, pipeline
from deeper_jax.data import fingerprint
from deeper_jax.data.array_record_source import ArrayRecordSource, decode_record
from deeper_jax.data.pack import pack_folder
from deeper_jax.errors import DatasetNotFoundError

BROKEN = {"broken/empty.jpg": "empty file", "broken/random_bytes.jpg": "UnidentifiedImageError",
          "broken/truncated.jpg": "does not decode"}
NUM_PHOTOS, NUM_FMNIST = 2 * 6, 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Crops of the scikit-learn sample photos, Fashion-MNIST PNGs, three broken files and
  one file that is not an image."""
  root = tmp_path_factory.mktemp("folder")
  (root / "photos").mkdir()
  (root / "fmnist").mkdir()
  (root / "broken").mkdir()
  rng = np.random.default_rng(0)
  for k, photo in enumerate(load_sample_images().images):
    for j in range(NUM_PHOTOS // 2):
      top, left = rng.integers(0, photo.shape[0] - 150), rng.integers(0, photo.shape[1] - 200)
      Image.fromarray(photo[top:top + 150, left:left + 200]).save(
          root / "photos" / f"{k}_{j}.jpg", quality=90)
  for i, image in enumerate(load_fashion_mnist("test").images(np.arange(NUM_FMNIST))):
    Image.fromarray(image[:, :, 0]).save(root / "fmnist" / f"{i:02d}.png")
  (root / "broken" / "empty.jpg").write_bytes(b"")
  (root / "broken" / "random_bytes.jpg").write_bytes(rng.bytes(5000))
  whole = (root / "photos" / "0_0.jpg").read_bytes()
  (root / "broken" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
  (root / "photos" / "notes.txt").write_text("not an image")
  return str(root)


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("packed") / "shards")
  return dst, pack_folder(folder, dst, shard_size=7)


def test_counts_and_reasons_of_the_pack(packed):
  dst, report = packed
  good = NUM_PHOTOS + NUM_FMNIST
  assert report.records == good and report.ignored == 1
  assert len(report.shards) == -(-good // 7)
  assert sorted(os.listdir(dst)) == sorted([*report.shards, "index.jsonl", "pack.json"])
  reasons = dict(report.skipped)
  assert sorted(reasons) == sorted(BROKEN)
  for path, words in BROKEN.items():
    assert words in reasons[path], (path, reasons[path])
  with open(os.path.join(dst, "pack.json")) as f:
    manifest = json.load(f)
  assert manifest["records"] == good and len(manifest["skipped"]) == 3
  assert report.summary().startswith(f"packed {good} images into {len(report.shards)} shards; "
                                     "3 files skipped")


def test_records_hold_the_files_bytes_unchanged(folder, packed):
  source = ArrayRecordSource(packed[0], 24)
  for i in (0, len(source) - 1):
    path, data = decode_record(source._records[i])  # pylint: disable=protected-access
    assert path == source.items[i][0]
    with open(os.path.join(folder, path), "rb") as f:
      assert f.read() == data


@pytest.mark.parametrize("channels", [3, 1])
def test_same_pixels_as_the_folder_source_in_the_same_order(folder, packed, channels):
  shards = ArrayRecordSource(packed[0], 24, channels=channels)
  files = ImageFolderSource(folder, 24, channels=channels)
  # The folder source still lists the truncated file (it only fails when read).
  kept = [i for i, p in enumerate(files.paths) if not p.endswith("truncated.jpg")]
  assert [item[0] for item in shards.items] == [
      os.path.relpath(files.paths[i], folder) for i in kept]
  assert len(shards) == NUM_PHOTOS + NUM_FMNIST and shards.labels is None
  got = shards.images(np.arange(len(shards)))
  assert got.shape == (len(shards), 24, 24, channels) and got.std() > 10
  np.testing.assert_array_equal(got, files.images(np.asarray(kept)))
  order = np.asarray([5, 0, 31, 5])
  np.testing.assert_array_equal(shards.images(order), got[order])


def test_decoded_in_worker_processes_as_in_the_calling_thread(packed):
  source = ArrayRecordSource(packed[0], 24)
  assert pipeline.resolve_kind("auto", source) == "processes"
  plan = np.arange(4 * 2 * 4).reshape(4, 2, 4) % len(source)
  blocks = [(slice(0, 2), slice(0, 4))]
  got = list(pipeline.batches(source, plan, blocks, start=1, workers=2, kind="processes"))
  want = [(source.images(step.reshape(-1)).reshape(2, 4, 24, 24, 3),) for step in plan[1:]]
  assert len(got) == 3
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g[0], w[0])


def test_selected_by_the_config_and_fingerprinted_by_content(folder, packed, tmp_path):
  datasets = build_datasets(data_config(name="array_record", data_dir=packed[0], image_size=24))
  assert isinstance(datasets.train, ArrayRecordSource)
  assert datasets.train.image_shape == (24, 24, 3)
  assert datasets.labelled_train is None and datasets.test is None
  again = str(tmp_path / "again")
  pack_folder(folder, again, shard_size=100)  # other shards, same images
  ids = fingerprint.item_ids(datasets.train)
  assert ids == fingerprint.item_ids(ArrayRecordSource(again, 24))
  assert len(set(ids)) == len(ids) and ids[0].startswith("fmnist/00.png\t")


def test_bad_inputs_are_refused_in_one_line(folder, packed, tmp_path):
  with pytest.raises(DatasetNotFoundError, match="not a packed image folder; make one with"):
    ArrayRecordSource(folder, 24)
  with pytest.raises(FileExistsError, match="is not an empty folder"):
    pack_folder(folder, packed[0])
  with pytest.raises(ValueError, match="shard_size must be a positive"):
    pack_folder(folder, str(tmp_path / "zero"), shard_size=0)


def test_command_line(folder, tmp_path):
  dst = tmp_path / "cli"
  cmd = [sys.executable, "-m", "deeper_jax.data.pack", "--src", folder, "--dst", str(dst),
         "--shard_size", "16"]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("packed 32 images into 2 shards; 3 files skipped")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("deeper_jax.data.pack: error: --dst")
