"""configs/tiny.py end to end, from the command line, as a user runs it.

The uninterrupted run is the reference: a run killed at any point and started again
with the same command must end with the same parameters, bit for bit, and the same
results. tests/launch.py is ``python -m deeper_jax.main`` with crash injection.
"""
import glob
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, test_config
from deeper_jax.runtime import checkpoints

LAUNCH = os.path.join(REPO, "tests", "launch.py")


def launch(workdir, *extra, kill_at=None, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("DEEPER_JAX_KILL_AT", None)
  if kill_at:
    env["DEEPER_JAX_KILL_AT"] = kill_at
  cmd = [sys.executable, LAUNCH, "--config", "configs/tiny.py", "--workdir", str(workdir),
         *extra]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def final_params(workdir):
  state = checkpoints.Checkpointer(str(workdir)).restore_state_tree()
  leaves = jax.tree_util.tree_leaves_with_path(
      {k: state[k] for k in ("params", "batch_stats", "heads", "step")})
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def comparable(results):
  """results.json without the timings, which differ between any two runs."""
  if isinstance(results, dict):
    return {k: comparable(v) for k, v in results.items()
            if k not in ("wall_seconds", "seconds")}
  if isinstance(results, list):
    return [comparable(v) for v in results]
  return results


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The reference end: tiny.py trained for 1 cycle, then continued to its 2 cycles
  (issue 16.9). The other tests end runs killed anywhere, or run straight, on it."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = launch(workdir, "--config.train.num_cycles=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  one_cycle = read_results(workdir)
  proc = launch(workdir)  # tiny.py: num_cycles = 2
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, read_results(workdir), proc.stderr, one_cycle


def test_tiny_run_writes_results(reference):
  workdir, results, log, _ = reference
  run = results["run"]
  assert run["train_images"] == 2048
  assert run["steps"] == 32 + 2 * 2 * 32  # RotNet epoch (S=4, b=16), 2 cycles × 2 epochs
  phases = [(c["phase"], c["cycle"]) for c in run["cycles"]]
  assert phases == [("rotnet_warmup", 0), ("clustering", 0), ("clustering", 1)]
  assert "nmi_previous_cycle" in run["cycles"][2]
  assert all(len(c["epoch_loss"]) == (1 if c["phase"] == "rotnet_warmup" else 2)
             for c in run["cycles"])
  probe = results["probe"]
  assert probe["protocol"] == "fast" and probe["layer"] == "conv3"
  assert 0.1 < probe["random_init_top1"] < 1.0 and 0.1 < probe["top1"] < 1.0
  assert 0.0 < results["clusters"]["nmi_labels"] < 1.0
  assert "ETA" in log  # progress lines on the long phases
  assert os.path.isdir(workdir / "checkpoints")


def test_running_again_resumes_instead_of_starting_over(reference):
  workdir = reference[0]
  before = final_params(workdir)
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from checkpoint" in proc.stderr
  assert "epoch 0: 32 steps" not in proc.stderr  # no training step was redone
  after = final_params(workdir)
  assert int(after["['step']"]) == int(before["['step']"])


def assert_same_end(workdir, reference, spilled=False, sections=None):
  """Parameters bit for bit, results.json but for timings (only ``sections``, for a run
  with fewer evaluators). ``spilled``: the k-means objectives (float sums, in another
  order when streamed from disk) to 1e-9."""
  ref_dir, ref_results = reference[:2]
  got, want = final_params(workdir), final_params(ref_dir)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  got_results = comparable(read_results(workdir))
  want_results = comparable(ref_results)
  if sections is not None:
    assert sorted(got_results) == sorted(sections)
    want_results = {k: want_results[k] for k in sections}
  got_results["run"].pop("data_fingerprint"), want_results["run"].pop("data_fingerprint")
  if spilled:
    for got_cycle, want_cycle in zip(got_results["run"]["cycles"], want_results["run"]["cycles"]):
      for key in ("kmeans_super_objective", "kmeans_sub_objective"):
        if key in want_cycle:
          assert got_cycle.pop(key) == pytest.approx(want_cycle.pop(key), rel=1e-9), key
  assert got_results == want_results


def test_killed_at_five_points_in_a_row_ends_bit_identical(reference, tmp_path):
  """SIGKILL in the RotNet warm-up, during extraction, during k-means, mid-epoch and
  mid-checkpoint-write; each restart resumes, the last one finishes. The killed runs
  are over their memory budget, so the extraction kill lands mid-spill (half-written
  files) and the k-means kill mid-stream over them; the last run holds its features
  in memory (the budget may change on a resume); the end is the reference's."""
  workdir = tmp_path / "killed"
  spill = "--config.clustering.memory_budget_gb=1e-6"
  # Checkpoints: 0 at the warm-up's end (step 32), 1 after the first clustering, 2 at
  # step 50, 3 at the end of the first epoch (64), 4 at the end of the second (96).
  for kill_at in ("step:20", "extract:2", "kmeans:3", "step:70", "save:4"):
    proc = launch(workdir, spill, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-3000:])
    if kill_at == "extract:2":  # killed while writing the first cycle's features
      assert "over the memory budget, spilled to" in proc.stderr
      assert glob.glob(str(workdir / "features" / "cycle_0" / "raw" / "*.partial"))
    if kill_at == "save:4":  # the kill landed inside Orbax's write of checkpoint 4
      assert any(p.name.startswith("4.") for p in (workdir / "checkpoints").iterdir())
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (workdir / "features").exists()  # every cycle's files removed after use
  assert_same_end(workdir, reference, spilled=True)


def test_sigterm_saves_and_exits_cleanly_then_resumes(reference, tmp_path):
  """Also the synchronous input path: decoding in the training thread (workers=0)
  ends bit-identical to the reference's 2 threads ahead of the step."""
  workdir = tmp_path / "preempted"
  proc = launch(workdir, "--config.data.workers=0", kill_at="step:40:SIGTERM")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SIGTERM received" in proc.stderr
  assert not (workdir / "results.json").exists()
  assert int(final_params(workdir)["['step']"]) == 40
  proc = launch(workdir, "--config.data.workers=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_same_end(workdir, reference)


def test_input_pipeline_workers_change_no_bit(reference, tmp_path):
  """Decoding in 2 spawned processes (every epoch and every extraction), with a SIGKILL
  mid-epoch and a resume, ends bit-identical to the reference's 2 threads. (Only the
  clusters evaluator: the probe adds nothing here but spawns.)"""
  workdir = tmp_path / "processes"
  processes = ("--config.data.workers=2", "--config.data.worker_kind=processes",
               "--config.eval.evaluators=clusters")
  proc = launch(workdir, *processes, kill_at="step:70")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  proc = launch(workdir, *processes)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from checkpoint" in proc.stderr
  assert_same_end(workdir, reference, sections=("run", "clusters"))


def test_more_cycles_continue_a_finished_run_and_fewer_are_refused(reference):
  """Issue 16.9: the reference ran 1 cycle, then was relaunched with 2; the killed and
  preempted runs above, trained straight to 2 cycles, end bit-identical to it. Asking for
  fewer cycles than a workdir has trained is refused in one line."""
  workdir, _, _, one_cycle = reference
  assert one_cycle["run"]["steps"] == 32 + 2 * 32
  assert [c["cycle"] for c in one_cycle["run"]["cycles"]] == [0, 0]
  proc = launch(workdir, "--config.train.num_cycles=1")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"deeper_jax: error: config.train.num_cycles=1 but workdir {workdir} has already trained "
      "2 cycles; pass --config.train.num_cycles=2 or more, or use a new --workdir.")


def test_export_then_load_pretrained_gives_the_training_backbone_features(reference):
  import deeper_jax
  from deeper_jax import export
  from deeper_jax.data.fashion_mnist import load_fashion_mnist
  workdir = reference[0]
  proc = launch(workdir, "--mode", "export")
  assert proc.returncode == 0, proc.stderr[-3000:]
  module, variables = deeper_jax.load_pretrained(str(workdir / "export"))
  trained_module, trained_variables = export.trained_backbone(test_config("tiny"),
                                                              str(workdir), channels=1)
  images = load_fashion_mnist("test").images(np.arange(64)).astype(np.float32) / 255
  got, got_blocks = module.apply(variables, images, train=False)
  want, want_blocks = trained_module.apply(trained_variables, images, train=False)
  assert "sobel" not in str(jax.tree_util.tree_structure(variables)).lower()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert list(got_blocks) == list(want_blocks)


def test_eval_mode_runs_every_evaluator_and_keeps_the_training_sections(reference):
  workdir = reference[0]
  before = read_results(workdir)
  proc = launch(workdir, "--mode", "eval",
                "--config.eval.evaluators=knn,finetune,cluster_grid,probe_paper")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = read_results(workdir)
  assert comparable(results["run"]) == comparable(before["run"])  # training's own record
  assert comparable(results["probe"]) == comparable(before["probe"])
  assert results["knn"]["top1"] > 0.3
  assert set(results["finetune"]["top1"]) == {"1%", "10%"}
  assert results["probe_paper"]["protocol"] == "paper"
  assert set(results["probe_paper"]["by_layer"]) == {"conv1_1", "conv2_1", "conv3_1"}
  assert (workdir / "eval" / "clusters.png").exists()
  assert (workdir / "eval" / "probe_paper_by_layer.png").exists()


def test_init_from_starts_the_backbone_from_another_run(reference):
  from deeper_jax import export, models
  from deeper_jax.train import state as state_lib
  config = test_config("tiny", **{"train.init_from": str(reference[0])})
  model = models.build_backbone(config.model)
  variables = export.load_backbone_variables(
      config.train.init_from, state_lib.init_variables(model, config, channels=1))
  want = final_params(reference[0])
  got = {jax.tree_util.keystr(p): np.asarray(v)
         for p, v in jax.tree_util.tree_leaves_with_path({"params": variables["params"]})}
  assert got and all(np.array_equal(got[k], want[k]) for k in got)
