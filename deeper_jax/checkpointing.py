"""Orbax checkpoints in the workdir: everything a run needs to continue exactly.

A checkpoint holds three items:

* ``state``: the :class:`TrainState` (backbone, BatchNorm statistics, heads, both
  optimiser states, step);
* ``clusters``: the current cycle's clustering as numpy arrays (PCA, centroids,
  super/sub assignments, the previous cycle's assignments for the stability NMI);
* ``progress``: JSON with the position in the schedule (cycle, epoch, next step of the
  epoch's sampling plan, whether this cycle is clustered yet) and the metric history.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so
a crash in mid-write leaves the previous checkpoint the latest usable one.
Checkpoints are numbered by a save counter, not the train step: the checkpoint taken
right after a clustering has the same train step as the one before it.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from deeper_jax import faults

ITEMS = ("state", "clusters", "progress")
CONFIG_FILE = "config.json"
# Fields that change what a run computes: a workdir written with other values of these
# cannot be resumed. Checkpoint cadence, logging and evaluation may change freely.
RESUME_FIELDS = ("seed", "data", "model", "method", "clustering", "train.batch_size",
                 "train.num_cycles", "train.epochs_per_cycle", "train.learning_rate",
                 "train.momentum", "train.weight_decay", "train.crop_pad", "train.init_from")


class Restored(NamedTuple):
  state: Any
  clusters: dict
  progress: dict


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=ITEMS)


class Checkpointer:
  """Saves and restores ``(state, clusters, progress)`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.join(workdir, "checkpoints")
    self.manager = _manager(self.directory, max_to_keep)

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, clusters: dict, progress: dict) -> int:
    latest = self.latest()
    index = 0 if latest is None else latest + 1
    clusters = dict(clusters) or {"empty": np.zeros((0,), np.int32)}
    _kill_mid_write_if_asked(self.directory, index)
    self.manager.save(index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        clusters=ocp.args.StandardSave(clusters),
        progress=ocp.args.JsonSave(progress)))
    self.manager.wait_until_finished()
    return index

  def restore(self, abstract_state, index: int | None = None) -> Restored | None:
    """The newest (or given) checkpoint placed like ``abstract_state``; None if none."""
    index = self.latest() if index is None else index
    if index is None:
      return None
    restored = self.manager.restore(index, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        clusters=ocp.args.StandardRestore(),
        progress=ocp.args.JsonRestore()))
    clusters = {k: np.asarray(v) for k, v in restored.clusters.items() if k != "empty"}
    return Restored(restored.state, clusters, dict(restored.progress))

  def restore_state_only(self, abstract_state) -> Any:
    """Only the train state of the newest checkpoint (to initialise another run)."""
    index = self.latest()
    if index is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}; check "
                              "config.train.init_from.")
    restored = self.manager.restore(index, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def close(self) -> None:
    self.manager.close()


def _kill_mid_write_if_asked(directory: str, index: int) -> None:
  """Fault injection (``DEEPER_JAX_KILL_AT=save:<index>``): SIGKILL while Orbax is
  writing checkpoint ``index``, as soon as its temporary folder exists."""
  spec = faults.parse()
  if spec is None or spec[:2] != ("save", index):
    return

  def watch():
    while True:
      if any(name.startswith(f"{index}.") and "tmp" in name
             for name in os.listdir(directory)):
        faults.reached("save", index)
      time.sleep(0.0005)
  threading.Thread(target=watch, daemon=True).start()


def abstract_like(tree) -> Any:
  """Shape/dtype/sharding skeleton of a pytree of arrays, for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _select(config_dict: dict, dotted: str):
  value = config_dict
  for part in dotted.split("."):
    value = value.get(part) if isinstance(value, dict) else None
  return value


def _flatten(prefix: str, value, out: dict) -> dict:
  if isinstance(value, dict):
    for key, sub in value.items():
      _flatten(f"{prefix}.{key}" if prefix else key, sub, out)
  else:
    out[prefix] = value
  return out


def check_resumable(workdir: str, config) -> None:
  """Writes the config on the first run; refuses to resume under a different one."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort())
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = []
  for field in RESUME_FIELDS:
    old = _flatten(field, _select(saved, field), {})
    new = _flatten(field, _select(current, field), {})
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        diffs.append(f"{key}: {old.get(key)!r} in the workdir, {new.get(key)!r} now")
  if diffs:
    raise ValueError(
        f"workdir {workdir} was written by a different config and cannot be resumed "
        f"({'; '.join(diffs)}); use a new --workdir or the original config.")
