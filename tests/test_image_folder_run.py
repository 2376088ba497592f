"""Pre-training on a folder of unlabelled photos, as a new user would (issue 16.1).

The main use case: bring your own uncurated collection. A run without labels must
finish cleanly, report what can be measured without labels, count the broken files it
skipped, and say that probes need ``data.eval_dir``.
"""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from conftest import REPO

BROKEN = {"truncated.jpg": None, "empty.jpg": b"", "notes.jpg": b"<html><body>404</body></html>",
          "noise.png": bytes(range(256)) * 4}


def plant_folder(root) -> int:
  """Real photos (crops of scikit-learn's sample photos, Fashion-MNIST items) in nested
  folders, plus broken files; returns the number of broken files."""
  from deeper_jax.data.fashion_mnist import load_fashion_mnist
  rng = np.random.default_rng(0)
  for name, photo in zip(("china", "flower"), load_sample_images().images):
    folder = root / "trips" / name
    folder.mkdir(parents=True)
    for i in range(60):
      top, left = rng.integers(0, photo.shape[0] - 120), rng.integers(0, photo.shape[1] - 160)
      Image.fromarray(photo[top:top + 120, left:left + 160]).save(folder / f"{i:03d}.jpg",
                                                                  quality=85)
  items = load_fashion_mnist("test").images(np.arange(120))
  (root / "scans").mkdir()
  for i, item in enumerate(items):
    Image.fromarray(item[..., 0]).resize((56, 56)).save(root / "scans" / f"{i:03d}.png")
  good = root / "trips" / "china" / "000.jpg"
  (root / "truncated.jpg").write_bytes(good.read_bytes()[:400])
  for name, content in BROKEN.items():
    if content is not None:
      (root / name).write_bytes(content)
  return len(BROKEN)


def test_unlabelled_folder_runs_to_the_end_and_reports_what_it_can(tmp_path):
  photos, workdir = tmp_path / "photos", tmp_path / "run"
  broken = plant_folder(photos)
  cmd = [sys.executable, "-m", "deeper_jax.main", "--config", "configs/image_folder.py",
         "--workdir", str(workdir), f"--config.data.data_dir={photos}",
         "--config.data.image_size=32", "--config.data.load_size=40",
         "--config.model.width=8", "--config.model.feature_dim=64",
         "--config.clustering.pca_dim=16", "--config.method.num_sub_clusters=4",
         "--config.train.num_cycles=2", "--config.train.epochs_per_cycle=1",
         "--config.method.rotnet_warmup_epochs=1",
         "--config.eval.evaluators=probe,knn,clusters,cluster_grid"]
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  run = results["run"]
  assert run["train_images"] == 240
  assert run["skipped_files"] == broken
  assert {line.split(":")[0].rsplit("/", 1)[-1] for line in run["skipped_examples"]} == set(BROKEN)
  clusters = results["clusters"]
  assert clusters["num_clusters"] == 16 and clusters["empty_clusters"] == 0
  assert 0.0 < clusters["nmi_previous_cycle"] <= 1.0  # stability needs no labels
  assert "nmi_labels" not in clusters
  for needs_labels in ("probe", "knn"):
    assert "config.data.eval_dir" in results[needs_labels]["skipped"]
  assert all(len(c["epoch_loss"]) == 1 and np.isfinite(c["epoch_loss"][0])
             for c in run["cycles"])
  assert (workdir / "eval" / "clusters.png").exists()
