"""Log lines a user watching a run needs, and none they do not.

* ``progress(phase, total)``: clu's ``ReportProgress`` for any long phase (feature
  extraction, probes, an epoch). The phase is announced with the work unit's task
  status, then every ``every_secs`` a line gives the rate, the fraction done and
  the ETA. Only process 0 reports.
* ``quiet_libraries()``: Orbax logs a dozen INFO lines per checkpoint through absl; a
  run saving every few hundred steps would bury the progress lines. Their warnings
  and errors still pass. JAX's note that it found no TPU and tfds's warnings about
  folders it searched (while we look for a local dataset) are dropped too, so that a
  config or data error reads as one line.
"""
from __future__ import annotations

import logging as std_logging

import jax
from absl import logging


class _Silent:
  """What ``progress`` returns on processes other than 0."""

  def __call__(self, step: int, t: float | None = None) -> bool:
    return False


def progress(phase: str, total: int, every_secs: float = 10.0):
  """A callable ``report(done)`` logging rate, percentage and ETA of ``phase``."""
  if jax.process_index() != 0:
    return _Silent()
  # Imported here: clu's periodic actions import TensorFlow, which a run that stops at a
  # config or data error never needs (and which logs on import).
  from clu import periodic_actions, platform  # pylint: disable=g-import-not-at-top
  platform.work_unit().set_task_status(f"{phase} ({total} steps)")
  return periodic_actions.ReportProgress(num_train_steps=total, every_secs=every_secs)


class _QuietLibraries(std_logging.Filter):
  # path fragment → the lowest level that still passes
  NOISY = {"/orbax/": std_logging.WARNING, "/etils/": std_logging.WARNING,
           "/jax/_src/xla_bridge": std_logging.WARNING,
           "/tensorflow_datasets/": std_logging.ERROR}

  def filter(self, record: std_logging.LogRecord) -> bool:
    for part, level in self.NOISY.items():
      if part in record.pathname:
        return record.levelno >= level
    return True


def quiet_libraries() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
