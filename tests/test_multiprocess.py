"""Two processes (``--distributed``, localhost, 2 CPU devices each) run configs/tiny.py
as one job, and end where one process with the same 4 devices ends.

What must be equal, and how equal:

* the clusterings (the checkpoint's ``clusters``, ``eval/final_clusters.npz``): the
  same labels. Each process extracts its own devices' rows, PCA and k-means run on
  the devices; k-means sums are exact integers, so the same features give the same
  labels bit for bit. The PCA is *not* bit-identical: one process adds the 4 shards'
  moments in order, gloo's all-reduce across 2 processes in another order. Measured
  (jax 0.10.2, this CPU): mean within 5e-8 and projection within 7e-6 of their
  largest entry; asserted: 1e-4 of it, far below what moves a label.
* per-step losses and the final parameters: to float tolerance, for the same reason
  (the gradients' all-reduce adds in gloo's order). Measured: losses within 1.4e-7
  relative, every parameter and optimiser tensor within 1.1e-6 of its largest entry;
  asserted: rtol 2e-6 and 2e-5 of the scale. (Conv biases followed by BatchNorm get
  no gradient and sit at ~1e-9, noise: an absolute 1e-7 covers them.)
* a killed or preempted two-process run, restarted, ends bit-identical to the
  uninterrupted two-process run: both use the same reduction order.

A process killed mid-epoch stops its partner (JAX's coordination service notices
the missing heartbeats; ``--heartbeat_timeout_seconds=10``), and a SIGTERM on one
process stops both at the same step, after one collective checkpoint. The runs share
a persistent XLA cache, so each program is compiled once for the module.
"""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from deeper_jax.runtime import checkpoints

# Six launches (one 1-process job, five 2-process jobs): ~4 min on 2 shared cores.
pytestmark = pytest.mark.slow

LAUNCH = os.path.join(REPO, "tests", "launch.py")
# tiny.py cut down: 512 images, no RotNet warm-up, one cycle of two epochs of 8 steps;
# a checkpoint every 4 steps, every step's loss logged; the probe and kNN evaluated.
ARGS = ["--config", "configs/tiny.py", "--config.data.max_train_images=512",
        "--config.method.rotnet_warmup_epochs=0", "--config.train.num_cycles=1",
        "--config.train.epochs_per_cycle=2", "--config.train.log_every_steps=1",
        "--config.checkpoint.every_steps=4", "--config.eval.evaluators=clusters,probe,knn"]
STEPS = 16


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def _env(devices: int, cache: str, kill_at: str | None = None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("DEEPER_JAX_KILL_AT", None)
  if kill_at:
    env["DEEPER_JAX_KILL_AT"] = kill_at
  return env


def launch_one(workdir, cache: str) -> subprocess.CompletedProcess:
  """One process with 4 devices."""
  return subprocess.run([sys.executable, LAUNCH, *ARGS, "--workdir", str(workdir)], cwd=REPO,
                        env=_env(4, cache), capture_output=True, text=True, timeout=900)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two(workdir, cache: str, kill_at: dict | None = None,
               extra: tuple = ()) -> list[tuple[int, str, int]]:
  """Processes 0 and 1 with 2 devices each: [(return code, stderr, pid)] in process order."""
  port, kill_at = _free_port(), kill_at or {}
  procs = [subprocess.Popen(
      [sys.executable, LAUNCH, *ARGS, *extra, "--workdir", str(workdir), "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       "--heartbeat_timeout_seconds=10"],
      cwd=REPO, env=_env(2, cache, kill_at.get(i)), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  # A guard against a hang, not a speed limit: a stuck job fails here instead of in CI.
  return [(p.wait(timeout=900), p.communicate()[1], p.pid) for p in procs]


def final_params(workdir) -> dict:
  state = checkpoints.Checkpointer(str(workdir)).restore_state_tree()
  leaves = jax.tree_util.tree_leaves_with_path(
      {k: state[k] for k in ("params", "batch_stats", "heads", "step")})
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def step_losses(workdir) -> dict[int, float]:
  """``train/loss`` of every logged step, from the TensorBoard events (later runs win)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # read-only, for the events
  losses = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "train/loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def read_json(workdir, name: str) -> dict:
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def without_timings(results):
  if isinstance(results, dict):
    return {k: without_timings(v) for k, v in results.items()
            if k not in ("wall_seconds", "seconds")}
  if isinstance(results, list):
    return [without_timings(v) for v in results]
  return results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, xla_cache):
  workdir = tmp_path_factory.mktemp("one_process")
  proc = launch_one(workdir, xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, xla_cache):
  workdir = tmp_path_factory.mktemp("two_processes")
  runs = launch_two(workdir, xla_cache)
  for rc, log, _ in runs:
    assert rc == 0, log[-3000:]
  return workdir, runs


def test_two_processes_cluster_exactly_like_one_process_of_as_many_devices(
    one_process, two_processes):
  two = two_processes[0]
  want, got = (checkpoints.Checkpointer(str(w)).restore_clusters() for w in (one_process, two))
  for key in ("super_labels", "sub_labels"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert len(np.unique(got["super_labels"])) == 2 and len(np.unique(got["sub_labels"])) == 4
  for key in ("pca_mean", "pca_projection"):  # float psum order: not bit for bit
    np.testing.assert_allclose(got[key], want[key], rtol=0,
                               atol=1e-4 * np.abs(want[key]).max(), err_msg=key)
  final_want = np.load(os.path.join(one_process, "eval", "final_clusters.npz"))
  final_got = np.load(os.path.join(two, "eval", "final_clusters.npz"))
  for key in ("super_labels", "sub_labels"):
    np.testing.assert_array_equal(final_got[key], final_want[key], err_msg=key)


def test_two_processes_train_like_one_process_to_float_tolerance(one_process, two_processes):
  two = two_processes[0]
  want_losses, got_losses = step_losses(one_process), step_losses(two)
  assert sorted(want_losses) == list(range(1, STEPS + 1))
  assert sorted(got_losses) == sorted(want_losses)
  np.testing.assert_allclose([got_losses[s] for s in sorted(want_losses)],
                             [want_losses[s] for s in sorted(want_losses)], rtol=2e-6)
  want, got = final_params(one_process), final_params(two)
  assert set(got) == set(want) and int(got["['step']"]) == STEPS
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0,
                               atol=2e-5 * np.abs(want[key]).max() + 1e-7, err_msg=key)
  results_want, results_got = (read_json(w, "results.json") for w in (one_process, two))
  for key in ("cluster_size_min", "cluster_size_max", "empty_clusters", "nmi_labels",
              "ari_labels", "purity_labels", "num_clusters"):
    assert results_got["clusters"][key] == results_want["clusters"][key], key
  assert results_got["run"]["steps"] == results_want["run"]["steps"] == STEPS
  # The probe and kNN run on each process's own rows with two processes (numpy with
  # one): same features to float tolerance, so the same predictions but for a rare tie.
  test_images = 1000  # tiny.py's probe_max_test_images
  for section in ("probe", "knn"):
    got, want = results_got[section]["top1"], results_want[section]["top1"]
    assert abs(got - want) <= 2 / test_images, (section, got, want)


def test_only_process_zero_writes_the_workdir_files(two_processes):
  two, runs = two_processes
  (_, _, pid0), _ = runs
  events = glob.glob(os.path.join(two, "events.out.tfevents.*"))
  assert events and all(path.split(".")[-3] == str(pid0) for path in events), events
  assert f"pid {pid0} on" in open(os.path.join(two, "run.lock")).read()
  assert read_json(two, "config.json")["data"]["max_train_images"] == 512
  assert read_json(two, "results.json")["run"]["train_images"] == 512


def test_eval_mode_on_two_processes_repeats_the_end_of_training_and_runs_every_evaluator(
    two_processes, tmp_path, xla_cache):
  """``--mode eval`` of the finished two-process run, on two processes: kNN, which
  training ran at its end, gives the same result bit for bit (same arrangement, same
  reduction order); the paper probe and fine-tuning (small here), which read their own
  batches, run on both processes too; process 0 alone writes."""
  workdir = tmp_path / "evaluated"
  shutil.copytree(two_processes[0], workdir)
  before = read_json(workdir, "results.json")
  small = {"paper_max_train_images": 256, "paper_max_test_images": 256,
           "finetune_steps": 4, "finetune_max_test_images": 256}
  runs = launch_two(workdir, xla_cache, extra=(
      "--mode", "eval", "--config.eval.evaluators=knn,probe_paper,finetune",
      *(f"--config.eval.{k}={v}" for k, v in small.items())))
  for rc, log, _ in runs:
    assert rc == 0, log[-3000:]
  after = read_json(workdir, "results.json")
  for section in ("run", "clusters", "probe", "knn"):  # training's, and kNN's again
    assert without_timings(after[section]) == without_timings(before[section]), section
  assert set(after["probe_paper"]["by_layer"]) == {"conv1_1", "conv2_1", "conv3_1"}
  assert 0.1 < after["probe_paper"]["top1"] <= 1.0  # 10 classes: above chance
  assert after["probe_paper"]["test_images"] == after["finetune"]["test_images"] == 256
  assert set(after["finetune"]["top1"]) == {"1%", "10%"}
  assert (workdir / "eval" / "probe_paper_by_layer.png").exists()


def test_a_killed_process_stops_the_job_and_sigterm_stops_both_at_one_step(
    two_processes, tmp_path, xla_cache):
  """SIGKILL of process 1 at step 6 (checkpoint at step 4): process 0 does not hang.
  Then, resumed, SIGTERM to process 0 at step 6: both save the same checkpoint at
  one later step and exit cleanly (the notice travels through the coordination
  service, so that step is a few steps on; 10 steps are left for it). Then both run
  to the end: bit-identical to the uninterrupted run. (Only the clusters evaluator:
  the probe and kNN were compared above.)"""
  workdir = tmp_path / "interrupted"
  launch = lambda **kwargs: launch_two(workdir, xla_cache,
                                       extra=("--config.eval.evaluators=clusters",), **kwargs)
  (rc0, log0, _), (rc1, _, _) = launch(kill_at={1: "step:6"})
  assert rc1 == -signal.SIGKILL
  assert rc0 != 0, log0[-3000:]  # stopped by the coordination service, not finished
  assert not (workdir / "results.json").exists()
  assert int(final_params(workdir)["['step']"]) == 4

  runs = launch(kill_at={0: "step:6:SIGTERM"})
  for rc, log, _ in runs:
    assert rc == 0, log[-3000:]
    assert "resumed from checkpoint" in log
    assert "preemption notice: every process saves a checkpoint after step" in log
  stopped_at = {int(log.split("checkpoint after step ")[1].split()[0]) for _, log, _ in runs}
  assert len(stopped_at) == 1, stopped_at
  stopped = stopped_at.pop()
  assert 6 <= stopped < STEPS
  assert int(final_params(workdir)["['step']"]) == stopped
  assert not (workdir / "results.json").exists()

  for rc, log, _ in launch():
    assert rc == 0, log[-3000:]
  want, got = final_params(two_processes[0]), final_params(workdir)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  want_results = without_timings(read_json(two_processes[0], "results.json"))
  got_results = without_timings(read_json(workdir, "results.json"))
  assert got_results["clusters"] == want_results["clusters"]
  assert got_results["run"]["cycles"] == want_results["run"]["cycles"]
