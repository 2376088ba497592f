"""Features over ``clustering.memory_budget_gb`` go to disk and are streamed: the same
clusters as in memory (cluster/spill.py, cluster/streamed.py).

What is equal, and how equal (one process, on the test process's devices; two
processes of two devices each: tests/test_per_process_rows.py): the streamed k-means gives the same assignments, centroids and
sizes bit for bit (exact integer sums, the same update kernel); its objective is
the float64 sum of per-row distances the in-memory path also sums, but one row's
distance may round differently in a fused kernel: measured within 2e-9 relative,
asserted 1e-7. The PCA fitted on spilled rows reads the same sample into the same
layout, so mean and projection are bit-identical, and so are the whitened rows.
"""
import os

import jax
import numpy as np
import pytest

from conftest import test_config
from deeper_jax.cluster import hierarchical, kmeans as kmeans_lib, pseudo_labels, spill
from deeper_jax.cluster.layout import as_rows
from deeper_jax.data import ArraySource, load_fashion_mnist
from deeper_jax.extract import features as features_lib
from deeper_jax.models import build_backbone
from deeper_jax.reduce import pca as pca_lib
from deeper_jax.runtime.mesh import make_mesh
from deeper_jax.train.state import init_variables


@pytest.fixture(scope="module")
def blobs():
  """3001 rows in 12 blobs, an N that no device count divides."""
  rng = np.random.default_rng(0)
  centres = 3 * rng.normal(size=(12, 24))
  return (rng.normal(size=(3001, 24)) + centres[rng.integers(0, 12, 3001)]).astype(np.float32)


def spilled(x: np.ndarray, directory) -> spill.Spilled:
  writer = spill.Writer(str(directory), len(x), x.shape[1], make_mesh())
  writer.write_rows(np.arange(len(x)), x)
  return writer.close()


def test_rows_are_written_one_file_per_device_block_and_read_back(blobs, tmp_path):
  on_disk = spilled(blobs, tmp_path)
  devices = jax.device_count()
  per = -(-len(blobs) // devices)
  files = sorted(os.listdir(tmp_path))
  assert files == sorted(f"process_0_shard_{s}.npy" for s in range(devices))
  for s in range(devices):
    np.testing.assert_array_equal(np.load(tmp_path / f"process_0_shard_{s}.npy"),
                                  blobs[s * per:(s + 1) * per])
  rows = np.concatenate([r for r, _ in on_disk.chunks(500)])
  np.testing.assert_array_equal(rows, np.arange(len(blobs)))  # every row once, in order
  picks = np.array([3000, 0, 751, 1502])
  np.testing.assert_array_equal(on_disk.read_rows(picks), blobs[picks])
  on_disk.remove()
  assert not tmp_path.exists()


def test_streamed_kmeans_is_the_in_memory_kmeans(blobs, tmp_path):
  on_disk = spilled(blobs, tmp_path / "x")
  want = kmeans_lib.kmeans(as_rows(blobs), 10, num_iters=6, seed=3, chunk_size=256)
  got = kmeans_lib.kmeans(on_disk, 10, num_iters=6, seed=3, chunk_size=256)
  np.testing.assert_array_equal(got.assignments, want.assignments)
  np.testing.assert_array_equal(got.centroids, want.centroids)
  np.testing.assert_array_equal(got.sizes, want.sizes)
  assert got.objective == pytest.approx(want.objective, rel=1e-7)
  assert len(np.unique(got.assignments)) == 10

  want = hierarchical.hierarchical_kmeans(as_rows(blobs), 3, 4, num_iters=5, seed=1,
                                          chunk_size=256)
  got = hierarchical.hierarchical_kmeans(on_disk, 3, 4, num_iters=5, seed=1, chunk_size=256)
  np.testing.assert_array_equal(got.super_labels, want.super_labels)
  np.testing.assert_array_equal(got.sub_labels, want.sub_labels)
  np.testing.assert_array_equal(got.sub_sizes, want.sub_sizes)
  assert got.sub_objective == pytest.approx(want.sub_objective, rel=1e-7)

  with pytest.raises(ValueError, match="cannot stream over spilled rows"):
    kmeans_lib.kmeans(on_disk, 10, init="kmeans++")


def test_pca_of_spilled_rows_is_the_in_memory_pca(blobs, tmp_path):
  on_disk = spilled(blobs, tmp_path / "x")
  want = pca_lib.fit_pca_whitening(as_rows(blobs), 8, sample_size=1000, seed=2)
  got = pca_lib.fit_pca_whitening(on_disk, 8, sample_size=1000, seed=2)
  np.testing.assert_array_equal(got.mean, want.mean)
  np.testing.assert_array_equal(got.projection, want.projection)
  reduced = pca_lib.apply_pca_whitening(got, on_disk, chunk_size=512, out_dir=tmp_path / "y")
  np.testing.assert_array_equal(reduced.read_rows(np.arange(len(blobs))),
                                pca_lib.apply_pca_whitening(want, as_rows(blobs),
                                                            chunk_size=512).to_numpy())


@pytest.fixture(scope="module")
def tiny_run():
  """configs/tiny.py's network (random init) and 1200 Fashion-MNIST images."""
  config = test_config("tiny", **{"clustering.num_iters": 4})
  model = build_backbone(config.model)
  variables = init_variables(model, config, 1)
  train = load_fashion_mnist("train")
  idx = np.arange(1200)
  return config, model, variables, ArraySource(train.images(idx), train.labels[idx], 10)


def cluster(tiny_run, workdir, budget_gb: float):
  config, model, variables, source = tiny_run
  config = config.copy_and_resolve_references()
  config.clustering.memory_budget_gb = budget_gb
  return pseudo_labels.cluster_backbone(model, variables, source, config, cycle=1,
                                        mesh=make_mesh(), workdir=str(workdir))


def test_a_cycle_over_budget_spills_and_clusters_like_one_in_memory(tiny_run, tmp_path,
                                                                    monkeypatch):
  config, model, variables, source = tiny_run
  # 1200 rows x 64 dims x 4 bytes = 307 kB: a budget of 0.1 MB spills, 1 GB does not.
  assert pseudo_labels.spills(model, variables, source,
                              _with_budget(config, 1e-4), make_mesh())
  assert not pseudo_labels.spills(model, variables, source, _with_budget(config, 1.0),
                                  make_mesh())
  want, want_metrics = cluster(tiny_run, tmp_path / "memory", 0.0)
  assert not (tmp_path / "memory" / "features").exists()

  # Killed mid-extraction (after 2 of the spill's steps): blocks half written.
  original = features_lib.map_rows

  def dies_after_two_steps(*args, **kwargs):
    def on_batch(done):
      if done == 2:
        raise KeyboardInterrupt("killed")
    return original(*args, **dict(kwargs, on_batch=on_batch))

  monkeypatch.setattr(features_lib, "map_rows", dies_after_two_steps)
  with pytest.raises(KeyboardInterrupt):
    cluster(tiny_run, tmp_path / "disk", 1e-4)
  left = os.listdir(tmp_path / "disk" / "features" / "cycle_1" / "raw")
  assert left and all(name.endswith(spill.TMP) for name in left), left  # none looks finished
  monkeypatch.setattr(features_lib, "map_rows", original)

  spilled_to = []
  monkeypatch.setattr(spill.Writer, "close", _recording(spill.Writer.close, spilled_to))
  got, got_metrics = cluster(tiny_run, tmp_path / "disk", 1e-4)  # resumed: done again
  assert [os.path.basename(m.directory) for m in spilled_to] == ["raw", "reduced"]
  for key in ("super_labels", "sub_labels", "pca_mean", "pca_projection"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert len(np.unique(got["super_labels"])) == 2
  for key, value in want_metrics.items():
    assert got_metrics[key] == pytest.approx(value, rel=1e-7), key
  assert not (tmp_path / "disk" / "features").exists()  # cleaned up after clustering


def _with_budget(config, budget_gb: float):
  config = config.copy_and_resolve_references()
  config.clustering.memory_budget_gb = budget_gb
  return config


def _recording(close, into: list):
  def wrapped(self):
    matrix = close(self)
    into.append(matrix)
    return matrix
  return wrapped
