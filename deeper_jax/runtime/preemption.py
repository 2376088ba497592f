"""SIGTERM / SIGINT → finish the current step, save, exit cleanly.

Cluster schedulers announce preemption with SIGTERM; a user stops a run with Ctrl-C.
Either way the loop sees ``requested()`` between two steps, writes a checkpoint and
returns, so the next launch resumes where this one stopped.
"""
from __future__ import annotations

import contextlib
import signal
import threading

from absl import logging


class StopRequest:

  def __init__(self):
    self._event = threading.Event()
    self.signal_name = ""

  def requested(self) -> bool:
    return self._event.is_set()

  def _handle(self, signum, _frame) -> None:
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint and stopping.", self.signal_name)
    self._event.set()


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
  """Installs the handlers (main thread only) and restores the old ones on exit."""
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {s: signal.signal(s, request._handle) for s in signals}
  try:
    yield request
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
