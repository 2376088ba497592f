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


def test_saving_a_checkpoint_leaves_jax_preemption_protocol_alone(tmp_path, monkeypatch):
  """The protocol keeps one step counter per process, driven by the loop's train
  steps (StopRequest.at_step); Orbax's manager would also call it, with checkpoint
  numbers, and a job preempted after a resume would then never reach its stop step."""
  import numpy as np
  from jax.experimental import multihost_utils
  from deeper_jax.runtime import checkpoints

  calls = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: calls.append(step) or False)
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  for _ in range(2):
    ckpt.save({"w": np.arange(3.0)}, {"super_labels": np.zeros(4, np.int32)}, {"epoch": 0})
  assert ckpt.latest() == 1
  assert calls == []


@pytest.mark.parametrize("flags, stops", [((0, 0), False), ((0, 1), True), ((1, 1), True)])
def test_without_the_preemption_service_one_process_signal_stops_every_process(
    monkeypatch, flags, stops):
  """With JAX's preemption service off (``jax_enable_preemption_service=False``) the
  processes all-gather their local flags after every step: a signal seen by any one of
  them stops all of them at that same step, and a request stays agreed afterwards."""
  import numpy as np
  from jax.experimental import multihost_utils

  sent = []
  monkeypatch.setattr(preemption, "_preemption_service", lambda: False)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda local: sent.append(int(local)) or np.asarray(flags, np.int32))
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: pytest.fail("the service is off: its sync point is unused"))
  stop = preemption.StopRequest(distributed=True)
  if flags[0]:
    stop._handle(signal.SIGTERM, None)  # this process (index 0) got the signal itself
  assert not stop.requested()  # nothing is agreed before the step's all-gather
  assert stop.at_step(7) is stops
  assert stop.requested() is stops
  assert sent == [flags[0]]  # this process sent its own flag
  if stops:
    assert stop.at_step(8) and sent == [flags[0]]  # agreed once; no further all-gather
