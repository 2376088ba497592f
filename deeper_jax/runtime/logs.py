"""Log lines a user watching a run needs, and none they do not.

* ``progress(phase, total)``: clu's ``ReportProgress`` for any long phase (feature
  extraction, probes, an epoch). The phase is announced with the work unit's task
  status, then every ``every_secs`` a line gives the rate, the fraction done and
  the ETA. Only process 0 reports.
* ``quiet_libraries()``: Orbax logs a dozen INFO lines per checkpoint through absl; a
  run saving every few hundred steps would bury the progress lines. Their warnings
  and errors still pass.
"""
from __future__ import annotations

import logging as std_logging

import jax
from absl import logging
from clu import periodic_actions
from clu import platform


class _Silent:
  """What ``progress`` returns on processes other than 0."""

  def __call__(self, step: int, t: float | None = None) -> bool:
    return False


def progress(phase: str, total: int, every_secs: float = 10.0):
  """A callable ``report(done)`` logging rate, percentage and ETA of ``phase``."""
  if jax.process_index() != 0:
    return _Silent()
  platform.work_unit().set_task_status(f"{phase} ({total} steps)")
  return periodic_actions.ReportProgress(num_train_steps=total, every_secs=every_secs)


class _QuietLibraries(std_logging.Filter):
  NOISY = ("/orbax/", "/etils/")

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in self.NOISY)
    return record.levelno >= std_logging.WARNING or not noisy


def quiet_libraries() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
