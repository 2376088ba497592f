"""SIGTERM (scheduler preemption) and SIGINT (Ctrl-C) ask the loop to save and stop."""
import os
import signal

import pytest

from deeper_jax.runtime import preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_stop_request_and_handlers_are_restored(signum):
  before = signal.getsignal(signum)
  with preemption.stop_on_signals() as stop:
    assert not stop.requested()
    os.kill(os.getpid(), signum)   # delivered to the main thread before kill() returns
    assert stop.requested()
    assert stop.signal_name == signal.Signals(signum).name
  assert signal.getsignal(signum) is before
