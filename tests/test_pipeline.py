"""The input pipeline (deeper_jax/data/pipeline.py) is the synchronous read, ahead of time.

Whatever decodes (the calling thread, threads, spawned processes) and wherever an
epoch starts, step ``i`` yields exactly ``source.images(plan[i][block])`` for each of
this process's blocks, in plan order; broken files of an image folder are replaced and
reported as the synchronous path replaces and reports them.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from conftest import REPO
from deeper_jax.data import ImageFolderSource, load_fashion_mnist, pipeline, sampler
from deeper_jax.data.sources import resized

# (kind, workers): the synchronous path, threads, spawned processes.
MODES = [("auto", 0), ("threads", 2), ("processes", 2), ("processes", 1)]
WHOLE = [(slice(0, 4), slice(0, 8))]
QUARTERS = [(slice(0, 2), slice(0, 4)), (slice(0, 2), slice(4, 8)),
            (slice(2, 4), slice(0, 4)), (slice(2, 4), slice(4, 8))]


def synchronous(source, plan, blocks, start=0):
  """What each step must yield: the blocks read directly, one by one."""
  return [[source.images(step[rows, cols].reshape(-1)).reshape(
      step[rows, cols].shape + source.image_shape) for rows, cols in blocks]
          for step in plan[start:]]


def make_plan(num_images, seed=0):
  labels = np.arange(num_images) % 2
  return sampler.epoch_plan(labels, np.arange(num_images) % 3, num_super_clusters=2,
                            num_rotations=2, batch_per_super=8, seed=seed, cycle=0, epoch=0)


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for step, (got_blocks, want_blocks) in enumerate(zip(got, want)):
    assert len(got_blocks) == len(want_blocks)
    for g, w in zip(got_blocks, want_blocks):
      assert g.dtype == np.uint8 and g.shape == w.shape, step
      np.testing.assert_array_equal(g, w, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def fmnist():
  """An in-memory source seen through a resize view (what Fashion-MNIST at 32 px is)."""
  return resized(load_fashion_mnist("test").subset(np.arange(300)), 32)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """Real photo crops and Fashion-MNIST PNGs, plus one truncated JPEG (fails at read)."""
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for k, photo in enumerate(load_sample_images().images):
    for j in range(20):
      top, left = rng.integers(0, photo.shape[0] - 120), rng.integers(0, photo.shape[1] - 160)
      Image.fromarray(photo[top:top + 120, left:left + 160]).save(
          root / f"photo_{k}_{j:02d}.jpg", quality=90)
  for i, image in enumerate(load_fashion_mnist("test").images(np.arange(40))):
    Image.fromarray(image[:, :, 0]).save(root / f"fmnist_{i:02d}.png")
  good = (root / "photo_0_00.jpg").read_bytes()
  (root / "photo_0_05_truncated.jpg").write_bytes(good[:len(good) // 2])
  return str(root)


@pytest.mark.parametrize("kind,workers", MODES)
@pytest.mark.parametrize("start", [0, 5])
def test_every_step_equals_the_synchronous_read(fmnist, kind, workers, start):
  plan = make_plan(len(fmnist))
  assert len(plan) > 5
  got = list(pipeline.batches(fmnist, plan, QUARTERS, start=start, workers=workers,
                              kind=kind, prefetch=3))
  assert_same_batches(got, synchronous(fmnist, plan, QUARTERS, start))


@pytest.mark.parametrize("kind,workers", MODES)
def test_a_broken_file_is_replaced_in_workers_and_reported_to_the_run(photo_folder, kind,
                                                                      workers):
  reference = ImageFolderSource(photo_folder, 24)
  source = ImageFolderSource(photo_folder, 24)
  broken = reference.paths.index(os.path.join(photo_folder, "photo_0_05_truncated.jpg"))
  plan = make_plan(len(source), seed=1)
  assert (plan == broken).any()  # the epoch reads the truncated file
  want = synchronous(reference, plan, WHOLE)
  got = list(pipeline.batches(source, plan, WHOLE, workers=workers, kind=kind))
  assert_same_batches(got, want)
  # The run's own copy knows the failure, found in a worker or not: reported once.
  assert source.num_read_failures == reference.num_read_failures == 1
  assert source.skipped == reference.skipped
  assert source.read_failures() == [(broken, reference.read_failures()[0][1])]
  # The next epoch's workers start from the run's copy: the file is known, not re-reported.
  again = list(pipeline.batches(source, plan, WHOLE, start=2, workers=workers, kind=kind))
  assert_same_batches(again, want[2:])
  assert source.num_read_failures == 1 and source.skipped == reference.skipped


def test_stopping_early_closes_the_workers(photo_folder):
  source = ImageFolderSource(photo_folder, 24)
  plan = make_plan(len(source))
  feed = pipeline.batches(source, plan, WHOLE, workers=2, kind="processes")
  first = next(feed)
  feed.close()  # what the training loop does when a run stops mid-epoch
  assert_same_batches([first], synchronous(source, plan, WHOLE)[:1])


def test_auto_uses_processes_only_for_long_reads_of_sources_that_decode_files(fmnist,
                                                                             photo_folder):
  folder, long_read = ImageFolderSource(photo_folder, 24), pipeline.AUTO_PROCESS_IMAGES
  assert pipeline.resolve_kind("auto", folder) == "processes"
  assert pipeline.resolve_kind("auto", folder.subset(np.arange(10)), long_read) == "processes"
  assert pipeline.resolve_kind("auto", folder, long_read - 1) == "threads"  # start-up > gain
  assert pipeline.resolve_kind("auto", fmnist) == "threads"
  assert pipeline.resolve_kind("auto", fmnist, 10 * long_read) == "threads"
  assert pipeline.resolve_kind("threads", folder) == "threads"
  assert pipeline.resolve_kind("processes", folder, 1) == "processes"
  with pytest.raises(ValueError, match="worker kind must be one of"):
    pipeline.resolve_kind("fibers", folder)


def test_bad_arguments_are_refused_in_one_line(fmnist):
  plan = make_plan(len(fmnist))
  for kwargs, message in (({"workers": -1}, "workers must be >= 0"),
                          ({"prefetch": 0}, "prefetch >= 1"),
                          ({"start": len(plan) + 1}, "outside the plan")):
    with pytest.raises(ValueError, match=message):
      next(pipeline.batches(fmnist, plan, WHOLE, **kwargs))
  with pytest.raises(ValueError, match="int \\[steps, S, b\\]"):
    next(pipeline.batches(fmnist, plan[0], WHOLE))


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_feature_extraction_through_workers_is_the_synchronous_extraction(photo_folder, kind):
  """Extraction, the evaluators' batches and fine-tuning read through the same pipeline:
  decoding ahead in workers changes no output bit and reports the same broken file."""
  from deeper_jax.evaluate.finetune import _batch_plan
  from deeper_jax.extract import features as features_lib
  from test_extract import random_network
  module, variables = random_network("small_cnn28", 4, 16, 24, channels=3)
  indices = np.arange(5, 5 + 53)  # 53 rows: a padded last batch / device block
  outputs, failures = {}, {}
  for decode in (pipeline.Decode(), pipeline.Decode(2, kind, 3)):
    source = ImageFolderSource(photo_folder, 24)
    run = lambda fn, **kw: fn(module, variables, source, batch_size=16, layers="conv1",
                              indices=indices, decode=decode, **kw)
    rows = run(features_lib.extract_rows, mesh=features_lib.mesh_lib.make_mesh())
    outputs[decode] = {"numpy": run(features_lib.extract_features),
                       "rows": {k: v.to_numpy() for k, v in rows.items()}}
    failures[decode] = source.read_failures()
  (sync, ahead), (sync_failed, ahead_failed) = outputs.values(), failures.values()
  for how in ("numpy", "rows"):
    assert sync[how].keys() == {"features", "conv1"}
    for k in sync[how]:
      assert sync[how][k].shape[0] == 53
      np.testing.assert_array_equal(ahead[how][k], sync[how][k], err_msg=f"{how} {k}")
  np.testing.assert_array_equal(sync["numpy"]["features"], sync["rows"]["features"])
  broken = ImageFolderSource(photo_folder, 24).paths.index(
      os.path.join(photo_folder, "photo_0_05_truncated.jpg"))
  assert broken in indices and sync_failed == ahead_failed and len(sync_failed) == 1
  # Fine-tuning's plan: sorted batches of fresh permutations, every image once per pass.
  plan = _batch_plan(indices, steps=7, batch_size=16, seed=0)
  assert plan.shape == (7, 16) and (np.diff(plan, axis=1) > 0).all()
  assert sorted(np.concatenate(plan[:3])) == sorted(set(np.concatenate(plan[:3])))


def test_device_batch_assembles_the_prefetched_blocks_of_each_device(with_devices):
  """8 devices, a 4 × 2 mesh: the pipeline decodes this process's 4 distinct blocks once,
  and the global batch equals the one device_batch reads itself."""
  info = with_devices("""
    import json
    import jax, numpy as np
    from deeper_jax.data import load_fashion_mnist, pipeline
    from deeper_jax.runtime import mesh as mesh_lib
    from deeper_jax.train import step as step_lib
    from deeper_jax.train.loop import device_batch
    source = load_fashion_mnist('test')
    shardings = step_lib.batch_shardings(mesh_lib.make_mesh(4))
    plan = (np.arange(3 * 4 * 6).reshape(3, 4, 6) * 7).astype(np.int32)
    sub = (np.arange(len(source)) % 5).astype(np.int32)
    blocks = pipeline.local_blocks(shardings['images'], plan.shape[1:])
    same = []
    for i, local in enumerate(pipeline.batches(source, plan, blocks, start=1, workers=2,
                                               kind='threads')):
      got = device_batch(source, plan[1 + i], sub, shardings, local)
      want = device_batch(source, plan[1 + i], sub, shardings)
      same.append(all(np.array_equal(np.asarray(got[k]), np.asarray(want[k]))
                      for k in ('images', 'sub_labels')))
    print(json.dumps({'same': same, 'blocks': [[b[0].start, b[0].stop, b[1].start, b[1].stop]
                                               for b in blocks]}))
  """)
  assert info["same"] == [True, True]
  assert len(info["blocks"]) == len({tuple(b) for b in info["blocks"]}) == 8


def test_workers_of_a_killed_run_exit_with_it():
  """A run killed outright (SIGKILL, OOM) cannot close its pipeline: its worker processes
  notice their parent is gone and exit, instead of holding its output pipes forever."""
  code = textwrap.dedent("""
    import glob, os, signal
    import numpy as np
    from deeper_jax.data import load_fashion_mnist, pipeline
    plan = (np.arange(50 * 4 * 8).reshape(50, 4, 8) % 1000).astype(np.int32)
    feed = pipeline.batches(load_fashion_mnist('test'), plan, [(slice(0, 4), slice(0, 8))],
                            workers=2, kind='processes')
    next(feed)
    children = []
    for path in glob.glob(f'/proc/{os.getpid()}/task/*/children'):
      children += open(path).read().split()
    print(' '.join(children), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  # capture_output: run() returns only once every holder of the pipes (workers too) exits.
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  children = proc.stdout.split()
  assert len(children) >= 2  # the two workers (and multiprocessing's resource tracker)
  # They exit within a poll period or so; the deadline only guards against a hang.
  deadline = time.monotonic() + 300
  while any(alive(pid) for pid in children) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not [pid for pid in children if alive(pid)]


def alive(pid: str) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      return "zombie" not in f.read()
  except FileNotFoundError:
    return False
