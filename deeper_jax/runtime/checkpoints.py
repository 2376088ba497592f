"""Orbax checkpoints in the workdir: everything a run needs to continue exactly.

A checkpoint holds three items:

* ``state``: the :class:`TrainState` (backbone, BatchNorm statistics, heads, both
  optimiser states, step);
* ``clusters``: the current cycle's clustering as numpy arrays (PCA, super/sub
  assignments);
* ``progress``: JSON with the position in the schedule (phase, cycle, whether this
  cycle is clustered yet, epoch, next step of the epoch's sampling plan), the metric
  history and the fingerprint of the training set.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so
a crash in mid-write leaves the previous checkpoint the latest usable one. A
checkpoint damaged later (a truncated file, a full disk, a bad copy) is found when
restoring: the next older intact one is used, with a warning naming both, and the
damaged one is moved aside to ``checkpoints_damaged/`` (nothing is deleted).
Checkpoints are numbered by a save counter, not the train step: the checkpoint taken
right after a clustering has the same train step as the one before it.
"""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from deeper_jax.errors import WorkdirError

ITEMS = ("state", "clusters", "progress")
DAMAGED_DIR = "checkpoints_damaged"


class Restored(NamedTuple):
  index: int
  state: Any
  clusters: dict
  progress: dict


def abstract_like(tree) -> Any:
  """Shape/dtype/sharding skeleton of a pytree of arrays, for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


_CLOSED_LOOP_LINES = ("Traceback (most recent call last):", "asyncio/base_events.py",
                      "self._check_closed()", "raise RuntimeError('Event loop is closed')",
                      "RuntimeError: Event loop is closed")


def _without_closed_loop_tracebacks(text: str) -> str:
  """``text`` without the lines of "Event loop is closed" tracebacks (interleaved, as
  several threads print them at once); other lines are kept (a traceback printed
  meanwhile would lose its "Traceback" header line, not its frames or message)."""
  if "RuntimeError: Event loop is closed" not in text:
    return text
  return "".join(line for line in text.splitlines(keepends=True)
                 if not any(part in line for part in _CLOSED_LOOP_LINES))


def _quiet_orbax_read_coroutines() -> None:
  """Installs (once) the ``sys.unraisablehook`` filter of ``_quiet_aborted_reads``."""
  previous = sys.unraisablehook
  if getattr(previous, "deeper_jax_quiet", False):
    return

  def hook(unraisable):
    name = getattr(unraisable.object, "__qualname__", "")
    if name.endswith("_read_array_index_and_device_put"):
      logging.vlog(1, "ignored after a failed restore: %s", unraisable.exc_value)
    else:
      previous(unraisable)

  hook.deeper_jax_quiet = True
  sys.unraisablehook = hook


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, kept out of JAX's preemption protocol.

  ``CheckpointManager.save`` asks ``multihost_utils.reached_preemption_sync_point``
  with the checkpoint's number. That protocol keeps one step counter per process,
  which the train loop drives with train steps (runtime/preemption.py); a call with
  a checkpoint number in between moves it back, and the stop step agreed on after a
  notice can then be one no process will reach: the job would not stop. Here only
  the loop decides when a checkpoint is a preemption checkpoint.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """Saves and restores ``(state, clusters, progress)`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self.manager = _Manager(self.directory, options=options, item_names=ITEMS)

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, clusters: dict, progress: dict) -> int:
    latest = self.latest()
    index = 0 if latest is None else latest + 1
    clusters = dict(clusters) or {"empty": np.zeros((1,), np.int32)}
    self.manager.save(index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        clusters=ocp.args.StandardSave(clusters),
        progress=ocp.args.JsonSave(progress)))
    self.manager.wait_until_finished()
    return index

  @staticmethod
  @contextlib.contextmanager
  def _quiet_aborted_reads():
    """A failed restore leaves TensorStore read coroutines that Python reports as
    "Exception ignored" tracebacks when they are collected, which can be long after the
    restore (Orbax's event loop may hold them); the failure itself is reported once, by
    ``restore``. From the first restore on, those reports, and only those, are logged at
    debug level; every other unraisable goes to the previous hook. Reads still in
    flight when Orbax closes its event loop print "Event loop is closed" tracebacks from
    TensorStore's threads straight to file descriptor 2; while a restore runs, that
    descriptor goes to a file, replayed without them once the reads have settled."""
    _quiet_orbax_read_coroutines()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        yield
      except Exception:
        time.sleep(0.5)  # let the aborted reads finish (local files: milliseconds)
        raise
      finally:
        gc.collect()
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        sys.stderr.write(_without_closed_loop_tracebacks(captured.read().decode(
            errors="replace")))
        sys.stderr.flush()

  def _restore_one(self, index: int, template_for: Callable[[dict], Any]) -> Restored:
    progress = self.manager.restore(index, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore())).progress
    restored = self.manager.restore(index, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template_for(dict(progress))),
        clusters=ocp.args.StandardRestore(self._numpy_target(index, "clusters"))))
    clusters = {k: np.asarray(v) for k, v in restored.clusters.items() if k != "empty"}
    return Restored(index, restored.state, clusters, dict(progress))

  def restore(self, template_for: Callable[[dict], Any]) -> Restored | None:
    """The newest intact checkpoint, its state placed like ``template_for(progress)``.

    None when the workdir has no checkpoint. Damaged checkpoints are skipped with a
    warning and moved aside; ``WorkdirError`` if none is intact.
    """
    indices = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for index in indices:
      try:
        with self._quiet_aborted_reads():
          restored = self._restore_one(index, template_for)
      except Exception as e:  # pylint: disable=broad-except  # any damage: try the next one
        failures.append((index, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
        continue
      if failures:
        self._move_aside([i for i, _ in failures])
        logging.warning(
            "checkpoint %s in %s is damaged (%s); resuming from checkpoint %d instead. The "
            "damaged one was moved to %s.", ", ".join(str(i) for i, _ in failures),
            self.directory, failures[0][1], index, os.path.join(self.workdir, DAMAGED_DIR))
      return restored
    if failures:
      raise WorkdirError(
          f"no intact checkpoint in {self.directory} (tried {', '.join(str(i) for i, _ in failures)}"
          f"; newest: {failures[0][1]}); move that folder away to start this run over, or "
          "use another --workdir.")
    return None

  def _numpy_target(self, index: int, item: str):
    """Zeros shaped like ``item`` of checkpoint ``index``: restores it as numpy.

    Without a target Orbax places arrays as they were saved, which fails when the
    devices differ (a run saved by 2 processes, read by 1; 8 devices, read on 1).
    """
    metadata = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(index) / item)
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), metadata.tree)

  def restore_state_tree(self) -> dict:
    """The raw train state (nested numpy dicts) of the newest checkpoint, no template.

    As numpy, whatever devices or processes wrote it."""
    index = self.latest()
    if index is None:
      raise WorkdirError(f"no checkpoint under {self.directory}; point config.train.init_from "
                         "at a training workdir or an export.")
    restored = self.manager.restore(index, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self._numpy_target(index, "state"))))
    return restored.state

  def restore_clusters(self) -> dict:
    """The newest checkpoint's clusters (numpy), no template; {} when there are none."""
    index = self.latest()
    if index is None:
      return {}
    restored = self.manager.restore(index, args=ocp.args.Composite(
        clusters=ocp.args.StandardRestore(self._numpy_target(index, "clusters"))))
    return {k: np.asarray(v) for k, v in restored.clusters.items() if k != "empty"}

  def _move_aside(self, indices: list[int]) -> None:
    if jax.process_index() == 0:
      target = os.path.join(self.workdir, DAMAGED_DIR)
      os.makedirs(target, exist_ok=True)
      for index in indices:
        source = os.path.join(self.directory, str(index))
        if os.path.exists(source):
          shutil.move(source, os.path.join(target, str(index)))
    if jax.process_count() > 1:  # every process must see the same latest checkpoint
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("deeper_jax: damaged checkpoints moved aside")
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()
