"""configs/tiny.py end to end, from the command line, as a user runs it.

The uninterrupted run is the reference: a run killed at any point and started again
with the same command must end with the same parameters, bit for bit, and the same
results.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

RESULT_KEYS = {"linear_probe_top1", "random_init_linear_probe_top1", "nmi_labels",
               "train_images", "wall_seconds"}


def launch(workdir, *extra, kill_at=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("DEEPER_JAX_KILL_AT", None)
  if kill_at:
    env["DEEPER_JAX_KILL_AT"] = kill_at
  cmd = [sys.executable, "-m", "deeper_jax.main", "--config", "configs/tiny.py",
         "--workdir", str(workdir), *extra]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)


def final_params(workdir):
  from deeper_jax import pretrained
  import jax
  state = pretrained._latest_state(str(workdir))
  leaves = jax.tree_util.tree_leaves_with_path(
      {k: state[k] for k in ("params", "batch_stats", "heads", "step")})
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def comparable(results):
  return {k: v for k, v in results.items() if k != "wall_seconds"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.json") as f:
    return workdir, json.load(f), proc.stderr


def test_tiny_run_writes_results(reference):
  workdir, results, log = reference
  assert RESULT_KEYS <= set(results)
  assert results["train_images"] == 2048
  assert 0.1 < results["random_init_linear_probe_top1"] < 1.0
  assert 0.1 < results["linear_probe_top1"] < 1.0
  assert 0.0 < results["nmi_labels"] < 1.0
  assert len(results["cycles"]) == 2  # one clustering per cycle, with its metrics
  assert "nmi_previous_cycle" in results["cycles"][1]
  assert "ETA" in log  # progress lines on the long phases
  assert os.path.isdir(workdir / "checkpoints")


def test_running_again_resumes_instead_of_starting_over(reference, tmp_path):
  workdir, results, _ = reference
  before = final_params(workdir)
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from checkpoint" in proc.stderr
  assert "cycle 0 epoch 0" not in proc.stderr  # no training step was redone
  after = final_params(workdir)
  assert int(after["['step']"]) == int(before["['step']"])


def assert_same_end(workdir, reference):
  ref_dir, ref_results, _ = reference
  got, want = final_params(workdir), final_params(ref_dir)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with open(workdir / "results.json") as f:
    assert comparable(json.load(f)) == comparable(ref_results)


def test_killed_at_four_points_in_a_row_ends_bit_identical(reference, tmp_path):
  """SIGKILL during extraction, during k-means, mid-epoch and mid-checkpoint-write."""
  workdir = tmp_path / "killed"
  for kill_at in ("extract:2", "kmeans:3", "step:70", "save:3"):
    proc = launch(workdir, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-3000:])
    if kill_at == "save:3":  # the kill landed inside Orbax's write of checkpoint 3
      assert any(p.name.startswith("3.") for p in (workdir / "checkpoints").iterdir())
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_same_end(workdir, reference)


def test_sigterm_saves_and_exits_cleanly_then_resumes(reference, tmp_path):
  workdir = tmp_path / "preempted"
  proc = launch(workdir, kill_at="step:40:SIGTERM")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SIGTERM received" in proc.stderr
  assert not (workdir / "results.json").exists()
  from deeper_jax import pretrained
  assert int(pretrained._latest_state(str(workdir))["step"]) == 40
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_same_end(workdir, reference)


def test_export_then_load_pretrained_gives_the_training_backbone_features(reference):
  import jax
  from configs import tiny
  import deeper_jax
  from deeper_jax import export_eval
  from deeper_jax.data.fashion_mnist import load_fashion_mnist
  workdir = reference[0]
  proc = launch(workdir, "--mode", "export")
  assert proc.returncode == 0, proc.stderr[-3000:]
  module, variables = deeper_jax.load_pretrained(str(workdir / "export"))
  trained_module, trained_variables = export_eval.trained_backbone(tiny.get_config(),
                                                                   str(workdir))
  images = load_fashion_mnist("test").images(np.arange(64)).astype(np.float32) / 255
  got, got_blocks = module.apply(variables, images, train=False)
  want, want_blocks = trained_module.apply(trained_variables, images, train=False)
  assert "sobel" not in str(jax.tree_util.tree_structure(variables)).lower()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert list(got_blocks) == list(want_blocks)


def test_eval_mode_chains_on_the_pretrained_run(reference):
  workdir = reference[0]
  proc = launch(workdir, "--mode", "eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "eval" / "results.json") as f:
    results = json.load(f)
  assert {"linear_probe_by_layer", "knn_top1", "nmi", "ari", "purity", "finetune"} <= set(results)
  assert results["knn_top1"] > 0.3
  assert (workdir / "eval" / "probe_by_layer.png").exists()


def test_init_from_starts_the_backbone_from_another_run(reference):
  import jax
  from configs import tiny
  from deeper_jax import models, state as state_lib, train_step as step_lib
  config = tiny.get_config()
  config.train.init_from = str(reference[0])
  model = models.build_backbone(config.model)
  tx = step_lib.make_optimizer(config.train)
  state = state_lib.initial_state(model, config, (28, 28, 1), tx, tx, 64)
  want = final_params(reference[0])
  got = {jax.tree_util.keystr(p): np.asarray(v)
         for p, v in jax.tree_util.tree_leaves_with_path({"params": state.params})}
  assert got and all(np.array_equal(got[k], want[k]) for k in got)
