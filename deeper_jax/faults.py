"""Deterministic crash injection, to test that a run killed anywhere resumes exactly.

Set ``DEEPER_JAX_KILL_AT=<point>[:<count>[:<signal>]]`` and the process sends itself
``signal`` (default SIGKILL: no cleanup, no atexit, like an OOM kill or a lost node)
when it reaches that point, e.g. ``extract:3`` (after the 3rd extraction batch),
``kmeans:2`` (after the 2nd Lloyd iteration of a cycle's clustering), ``step:70``
(after train step 70), ``save:4`` (while checkpoint 4 is being written) or
``step:40:SIGTERM`` (a preemption notice at step 40). Unset, it is a no-op.
"""
from __future__ import annotations

import os
import signal

ENV = "DEEPER_JAX_KILL_AT"


def parse() -> tuple[str, int | None, int] | None:
  spec = os.environ.get(ENV)
  if not spec:
    return None
  parts = spec.split(":")
  count = int(parts[1]) if len(parts) > 1 and parts[1] else None
  signum = getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGKILL
  return parts[0], count, signum


def reached(point: str, count: int | None = None) -> None:
  spec = parse()
  if spec is None:
    return
  name, at, signum = spec
  if name == point and (at is None or count == at):
    os.kill(os.getpid(), signum)
