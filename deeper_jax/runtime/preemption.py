"""SIGTERM / SIGINT → finish the current step, save, exit cleanly.

Cluster schedulers announce preemption with SIGTERM; a user stops a run with Ctrl-C.
Either way the loop asks ``at_step(step)`` after every train step and, when it says
stop, writes a checkpoint and returns, so the next launch resumes where this one
stopped.

One process: the signal handler sets a flag, and the loop stops after the step in
flight. Many processes: a checkpoint is a collective (every process writes its
shards), so the stop must be decided by all of them at the same step — a host that
stopped alone would leave the others waiting in the next step's all-reduce. JAX's
preemption service does this: its SIGTERM handler (installed by
``jax.distributed.initialize``) tells the coordinator, which picks the step after
the furthest one any process has reached, and
``multihost_utils.reached_preemption_sync_point(step)`` turns true on every process
at that same step. So with many processes SIGTERM is left to JAX, and SIGINT is
turned into a SIGTERM to join the same protocol. (If the preemption service is
switched off, the local flags are all-gathered after every step instead: slower,
the same decision.)
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np
from absl import logging


class StopRequest:
  """Whether to save and stop; one per run, created by :func:`stop_on_signals`."""

  def __init__(self, distributed: bool = False):
    self._event = threading.Event()
    self._agreed = False
    self.distributed = distributed
    self.signal_name = ""

  def requested(self) -> bool:
    """Stop at the next save point: this process's signal, or (many processes) the
    step all of them agreed on."""
    if self.distributed:
      return self._agreed
    return self._event.is_set()

  def at_step(self, step: int) -> bool:
    """Called by every process after every train step: True when all must stop now."""
    if not self.distributed or self._agreed:
      return self.requested()
    self._agreed = _all_agree(step, self._event.is_set())
    if self._agreed:
      self.signal_name = self.signal_name or "SIGTERM"
      logging.warning("preemption notice: every process saves a checkpoint after step %d "
                      "and stops.", step)
    return self._agreed

  def _handle(self, signum, _frame) -> None:
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint and stopping.", self.signal_name)
    self._event.set()

  def _forward(self, signum, _frame) -> None:
    """Many processes: Ctrl-C becomes a preemption notice for JAX's protocol."""
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: asking every process to save and stop.", self.signal_name)
    self._event.set()
    os.kill(os.getpid(), signal.SIGTERM)


def _preemption_service() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.preemption_sync_manager is not None


def _all_agree(step: int, local: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if _preemption_service():
    return bool(multihost_utils.reached_preemption_sync_point(step))
  flags = multihost_utils.process_allgather(np.int32(local))
  return bool(np.max(flags))


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
  """Installs the handlers (main thread only) and restores the old ones on exit.

  With many processes and JAX's preemption service, SIGTERM keeps JAX's handler.
  """
  distributed = jax.process_count() > 1
  request = StopRequest(distributed)
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  handlers = {s: request._handle for s in signals}
  if distributed and _preemption_service():
    handlers = {s: request._forward for s in signals if s != signal.SIGTERM}
  previous = {s: signal.signal(s, handler) for s, handler in handlers.items()}
  try:
    yield request
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
