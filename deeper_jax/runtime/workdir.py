"""What makes a workdir one run's: a lock, the config it was started with, its data.

* **Lock.** A second launch on a workdir that a live run is using would resume from
  that run's checkpoints and both would keep writing. ``lock`` takes an exclusive
  ``flock`` on ``<workdir>/run.lock`` and writes the holder's pid, host and start
  time into it. The kernel drops the lock when the holder dies, however it dies, so
  a lock file left by a dead process is recognised as stale and taken over.
* **Config.** ``config.json`` is written on the first launch. A later launch with other
  values of the fields that change what is computed is refused, naming each field.
  ``train.num_cycles`` may grow (training longer is the most common reason to resume:
  the schedule up to the old end does not depend on it); checkpoint cadence, logging
  and evaluation settings may change freely.
* **Data.** Cluster assignments are indices into the training set's order. The set's
  fingerprint is stored in every checkpoint, its item list in ``train_set.txt``; a
  resume on a different set is refused, naming what was added, removed or changed.

Only process 0 writes files here.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import gzip
import json
import os
import socket

import jax
import numpy as np

from deeper_jax.errors import DataError, WorkdirError

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"
MANIFEST_FILE = "train_set.txt.gz"
# Fields that change what a run computes: a workdir written with other values of these
# cannot be resumed (train.num_cycles may grow: see the module docstring).
RESUME_FIELDS = ("seed", "data", "model", "method", "clustering", "train.batch_size",
                 "train.epochs_per_cycle", "train.learning_rate", "train.momentum",
                 "train.weight_decay", "train.crop", "train.crop_scale", "train.crop_ratio",
                 "train.crop_pad", "train.init_from")
# Fields of those that only say where to find the same images, or how to decode them
# or hold their features: the input pipeline's workers give the same batches, and
# spilled features the same clusters, bit for bit (a resume may change them).
HOW_FIELDS = ("data.data_dir", "data.download", "data.eval_dir", "data.max_eval_images",
              "data.workers", "data.worker_kind", "data.prefetch",
              "clustering.memory_budget_gb")


def write_json(path: str, payload: dict) -> None:
  """Atomic: written to a temporary file, then renamed. Only process 0 writes."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
  os.replace(tmp, path)


def _json_default(value):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.floating):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value)}")


@contextlib.contextmanager
def lock(workdir: str):
  """Holds ``<workdir>/run.lock`` for the duration; refuses if a live run holds it.

  Process 0 takes the lock for the whole job and tells the others whether it could,
  so that a refused launch stops every process, not only the one holding the lock.
  """
  handle, refusal = None, None
  if jax.process_index() == 0:
    handle, refusal = _take_lock(workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
    if refused and refusal is None:
      refusal = (f"workdir {workdir} is in use by a running job (process 0 could not take "
                 f"{LOCK_FILE}); wait for it to finish or stop it, or use another --workdir.")
  if refusal is not None:
    raise WorkdirError(refusal)
  try:
    yield
  finally:
    if handle is not None:
      fcntl.flock(handle, fcntl.LOCK_UN)
      handle.close()


def _take_lock(workdir: str):
  """(open locked handle, None) or (None, why not)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    return None, (f"workdir {workdir} is in use by a running job ({holder}); wait for it "
                  "to finish or stop it, or use another --workdir.")
  handle.seek(0)
  handle.truncate()
  started = datetime.datetime.now().isoformat(timespec="seconds")
  handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
  handle.flush()
  return handle, None


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


def config_differences(saved: dict, current: dict) -> list[str]:
  """``'field: old in the workdir, new now'`` for every resume field that differs."""
  diffs = []
  for field in RESUME_FIELDS:
    old = _flatten(field, _select(saved, field), {})
    new = _flatten(field, _select(current, field), {})
    for key in sorted(set(old) | set(new)):
      if key in HOW_FIELDS:
        continue
      if old.get(key) != new.get(key):
        diffs.append(f"{key}: {old.get(key)!r} in the workdir, {new.get(key)!r} now")
  return diffs


def check_config(workdir: str, config) -> None:
  """Writes the config on the first launch; refuses to resume under a different one."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort())
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    write_json(path, current)
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = config_differences(saved, current)
  if diffs:
    raise WorkdirError(
        f"workdir {workdir} was written by a different config and cannot be resumed "
        f"({'; '.join(diffs)}); use a new --workdir or the original config.")
  if current != saved:  # e.g. more cycles: the record follows the run
    write_json(path, current)


def check_cycles(workdir: str, config, progress: dict, last_phase: int) -> None:
  """``train.num_cycles`` may grow, never shrink below the cycles already trained."""
  done = progress["cycle"] if progress["phase"] == last_phase else 0
  if config.train.num_cycles < done:
    raise WorkdirError(
        f"config.train.num_cycles={config.train.num_cycles} but workdir {workdir} has already "
        f"trained {done} cycles; pass --config.train.num_cycles={done} or more, or use a new "
        "--workdir.")


def write_manifest(workdir: str, item_ids: list[str]) -> None:
  if jax.process_index() != 0:
    return
  tmp = os.path.join(workdir, MANIFEST_FILE + ".tmp")
  with gzip.open(tmp, "wt") as f:
    f.write("\n".join(item_ids))
  os.replace(tmp, os.path.join(workdir, MANIFEST_FILE))


def _read_manifest(workdir: str) -> list[str] | None:
  path = os.path.join(workdir, MANIFEST_FILE)
  if not os.path.exists(path):
    return None
  with gzip.open(path, "rt") as f:
    text = f.read()
  return text.split("\n") if text else []


def _describe_change(old: list[str] | None, new: list[str]) -> str:
  if old is None:
    return f"now {len(new)} images"
  key = lambda item: item.split("\t")[0]
  old_by_key, new_by_key = {key(i): i for i in old}, {key(i): i for i in new}
  added = [k for k in new_by_key if k not in old_by_key]
  removed = [k for k in old_by_key if k not in new_by_key]
  changed = [k for k in new_by_key if k in old_by_key and new_by_key[k] != old_by_key[k]]
  parts = [f"{len(items)} {what} (first: {items[0]})"
           for what, items in (("added", added), ("removed", removed), ("changed", changed))
           if items]
  if not parts:
    parts = ["the same items in another order"]
  return f"{len(old)} → {len(new)} images: " + ", ".join(parts)


def check_data(workdir: str, fingerprint: str, item_ids: list[str], saved: str | None) -> None:
  """Refuses to resume when the training set's fingerprint differs from the checkpoint's."""
  if saved is None or saved == fingerprint:
    return
  change = _describe_change(_read_manifest(workdir), item_ids)
  raise DataError(
      f"the training set changed since workdir {workdir} was checkpointed ({change}); its "
      "cluster assignments index the old set, so resuming would train on wrong pseudo-labels. "
      "Restore the original data, or start a new --workdir.")
