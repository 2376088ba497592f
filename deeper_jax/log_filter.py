"""Keeps the run's log readable: Orbax's per-save INFO chatter is dropped.

Orbax logs a dozen INFO lines per checkpoint through absl; a run saving every few
hundred steps would bury the progress lines. Warnings and errors still pass.
"""
import logging as std_logging

from absl import logging


class _QuietLibraries(std_logging.Filter):
  NOISY = ("/orbax/", "/etils/")

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in self.NOISY)
    return record.levelno >= std_logging.WARNING or not noisy


def install() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
