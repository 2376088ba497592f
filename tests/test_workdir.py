"""A workdir belongs to one run: the mistakes around it end in one clear line (issue 16).

Another config, another training set, a second launch while the first runs, a damaged
checkpoint, a bad flag, missing data: each is refused (or recovered from) with one line
on stderr and exit status 2, never a traceback.
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, test_config
from deeper_jax.errors import DataError, WorkdirError
from deeper_jax.runtime import workdir as workdir_lib

LAUNCH = os.path.join(REPO, "tests", "launch.py")
SMALL = ["--config.data.max_train_images=1024", "--config.train.num_cycles=1",
         "--config.train.epochs_per_cycle=1", "--config.method.rotnet_warmup_epochs=0",
         "--config.eval.evaluators=clusters"]


def command(workdir, *extra, config="configs/tiny.py"):
  return [sys.executable, LAUNCH, "--config", config, "--workdir", str(workdir), *extra]


def launch(workdir, *extra, kill_at=None, config="configs/tiny.py"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("DEEPER_JAX_KILL_AT", None)
  if kill_at:
    env["DEEPER_JAX_KILL_AT"] = kill_at
  return subprocess.run(command(workdir, *extra, config=config), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def one_line_error(proc) -> str:
  """The user-error line; fails unless the run exited 2 without a traceback."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("deeper_jax: error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0][len("deeper_jax: error: "):]


# --- Config -------------------------------------------------------------------------

def test_a_workdir_written_by_another_config_refuses_to_resume(tmp_path):
  config = test_config("tiny")
  workdir_lib.check_config(str(tmp_path), config)
  workdir_lib.check_config(str(tmp_path), config)  # same config: fine
  other = test_config("tiny", **{"method.num_sub_clusters": 7, "train.learning_rate": 0.5,
                                 "checkpoint.every_steps": 10,  # cadence may change freely
                                 "train.num_cycles": 5,         # so may the length
                                 "data.workers": 0,             # and how data is read/held
                                 "clustering.memory_budget_gb": 2.0})
  with pytest.raises(WorkdirError) as error:
    workdir_lib.check_config(str(tmp_path), other)
  message = str(error.value)
  assert "method.num_sub_clusters: 4 in the workdir, 7 now" in message
  assert "train.learning_rate: 0.05 in the workdir, 0.5 now" in message
  assert "checkpoint" not in message and "num_cycles" not in message
  assert "workers" not in message and "memory_budget" not in message
  assert "use a new --workdir or the original config" in message


@pytest.mark.parametrize("flag,message", [
    ("--config.modle.width=3", "--config.modle.width is not a config field (did you mean "
                               "config.model.width?)."),
    ("--config.train.learning_rate=abc", "flag --config.train.learning_rate=abc: could not "
                                         "convert string to float: 'abc'"),
    ("--config.eval.probe_layers=conv99", "config.eval.probe_layers='conv99' is not a layer of "
                                          "small_cnn28; use 'all' or some of conv1, conv2, "
                                          "conv3, features."),
    ("--config.clustering.num_iters=-3", "config.clustering.num_iters=-3 must be ≥ 0."),
    ("--config.train.learning_rate=nan", "config.train.learning_rate=nan must be a finite "
                                         "number."),
])
def test_a_bad_flag_is_one_line_before_any_compute(tmp_path, flag, message):
  proc = launch(tmp_path / "run", flag)
  assert one_line_error(proc) == message
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_offline_fails_at_once_with_the_way_to_get_it(tmp_path):
  """Issue 16.8: no local Fashion-MNIST (an empty data_dir) and no download: one line
  naming the Debian package and data_dir, within seconds (no network is tried)."""
  empty = tmp_path / "empty"
  empty.mkdir()
  start = time.monotonic()
  message = one_line_error(launch(tmp_path / "run", f"--config.data.data_dir={empty}"))
  assert "apt-get install dataset-fashion-mnist" in message
  assert "--config.data.data_dir=" in message
  assert time.monotonic() - start < 120  # generous: the point is no minutes of retries


# --- Lock ---------------------------------------------------------------------------

def test_a_second_launch_on_a_running_workdir_refuses_and_a_dead_ones_lock_is_stale(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", DEEPER_JAX_KILL_AT="step:10:SIGSTOP")
  first = subprocess.Popen(command(workdir, *SMALL), cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # wait until it holds the lock and is stopped
      if open(f"/proc/{first.pid}/stat").read().split()[2] == "T":
        break
      time.sleep(0.5)
    message = one_line_error(launch(workdir, *SMALL))
    assert message.startswith(f"workdir {workdir} is in use by a running job (pid {first.pid} on ")
    assert message.endswith("wait for it to finish or stop it, or use another --workdir.")
  finally:
    first.kill()
    first.wait()
  lock_text = (workdir / workdir_lib.LOCK_FILE).read_text()
  assert f"pid {first.pid}" in lock_text  # the dead run's lock file is still there...
  proc = launch(workdir, *SMALL, kill_at="step:1:SIGTERM")  # ...and is recognised as stale
  assert proc.returncode == 0 and "resumed from checkpoint" in proc.stderr, proc.stderr[-3000:]


# --- Data ---------------------------------------------------------------------------

def _photo_folder(root, count: int, start: int = 0):
  from deeper_jax.data.fashion_mnist import load_fashion_mnist
  images = load_fashion_mnist("test").images(np.arange(start, start + count))
  root.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(images, start=start):
    Image.fromarray(image[..., 0]).resize((40, 36)).save(root / f"img_{i:04d}.png")


def test_resuming_on_a_changed_training_set_is_refused_naming_what_changed(tmp_path):
  photos, workdir = tmp_path / "photos", tmp_path / "run"
  _photo_folder(photos, 120)
  flags = [f"--config.data.data_dir={photos}", "--config.method.num_super_clusters=2",
           "--config.method.num_sub_clusters=2", "--config.train.batch_size=32",
           "--config.clustering.pca_dim=16", "--config.data.image_size=32",
           "--config.data.load_size=36", "--config.train.num_cycles=1",
           "--config.method.rotnet_warmup_epochs=1"]
  config = "configs/image_folder.py"
  proc = launch(workdir, *flags, kill_at="step:2:SIGTERM", config=config)
  assert proc.returncode == 0 and "SIGTERM received" in proc.stderr, proc.stderr[-3000:]
  _photo_folder(photos, 3, start=500)        # three new files
  os.remove(photos / "img_0007.png")          # one gone
  message = one_line_error(launch(workdir, *flags, config=config))
  assert message.startswith(f"the training set changed since workdir {workdir} was "
                            "checkpointed (120 → 122 images: 3 added (first: img_0500.png), "
                            "1 removed (first: img_0007.png))")
  assert message.endswith("Restore the original data, or start a new --workdir.")


def test_check_data_names_a_rewritten_file(tmp_path):
  workdir_lib.write_manifest(str(tmp_path), ["a.png\t10\t1", "b.png\t20\t2"])
  workdir_lib.check_data(str(tmp_path), "same", ["a.png\t10\t1"], "same")  # same: fine
  with pytest.raises(DataError, match=r"2 → 2 images: 1 changed \(first: b\.png\)"):
    workdir_lib.check_data(str(tmp_path), "new", ["a.png\t10\t1", "b.png\t21\t3"], "old")


# --- Damaged checkpoints ------------------------------------------------------------

def _truncate_largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 3)
  return largest


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  workdir = tmp_path / "run"
  proc = launch(workdir, *SMALL, kill_at="step:10:SIGTERM")
  assert proc.returncode == 0, proc.stderr[-3000:]
  checkpoints = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert len(checkpoints) == 2
  _truncate_largest_file(workdir / "checkpoints" / str(checkpoints[-1]) / "state")
  proc = launch(workdir, *SMALL, kill_at="step:3:SIGTERM")  # resumes at step 0, stops at 3
  assert proc.returncode == 0 and "SIGTERM received" in proc.stderr, proc.stderr[-3000:]
  assert (f"checkpoint {checkpoints[-1]} in {workdir / 'checkpoints'} is damaged"
          in proc.stderr)
  assert f"resuming from checkpoint {checkpoints[0]} instead" in proc.stderr
  assert (workdir / "checkpoints_damaged" / str(checkpoints[-1])).is_dir()  # kept, not lost

  for index in os.listdir(workdir / "checkpoints"):  # now damage every checkpoint
    if index.isdigit():
      _truncate_largest_file(workdir / "checkpoints" / index / "state")
  message = one_line_error(launch(workdir, *SMALL))
  assert message.startswith(f"no intact checkpoint in {workdir / 'checkpoints'} (tried ")
  assert message.endswith("move that folder away to start this run over, or use another "
                          "--workdir.")
  shutil.rmtree(workdir / "checkpoints")


def test_closed_loop_noise_of_aborted_reads_is_dropped_and_nothing_else():
  from deeper_jax.runtime.checkpoints import _without_closed_loop_tracebacks
  noise = ("Traceback (most recent call last):\n"
           '  File "/usr/lib/python3.11/asyncio/base_events.py", line 806, in '
           "call_soon_threadsafe\n    self._check_closed()\n"
           "    raise RuntimeError('Event loop is closed')\n"
           "RuntimeError: Event loop is closed\n")
  log = "W1203 checkpoint 1 is damaged\n"
  assert _without_closed_loop_tracebacks(noise + log + noise) == log
  assert _without_closed_loop_tracebacks(log) == log
  other = "Traceback (most recent call last):\nValueError: boom\n"
  assert _without_closed_loop_tracebacks(other) == other


# --- Divergence ---------------------------------------------------------------------

def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  import jax
  from deeper_jax.runtime import checkpoints
  from deeper_jax.train import loop
  config = test_config("tiny", **{"data.max_train_images": 512, "train.num_cycles": 1,
                                  "method.rotnet_warmup_epochs": 0,
                                  "train.learning_rate": 999.0, "train.log_every_steps": 2,
                                  "checkpoint.every_steps": 2})
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"non-finite loss \((nan|inf|-inf)\) at step "
                                               r"\d+; the last good checkpoint"):
    loop.train_and_evaluate(config, workdir)
  state = checkpoints.Checkpointer(workdir).restore_state_tree()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
