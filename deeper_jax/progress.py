"""A progress line with ETA for every long phase (extraction, k-means, epochs).

Lines go through absl logging at most every ``every_seconds`` (and at the end), so a
user watching a long clustering on a big collection sees that it is alive and when it
will finish. Only process 0 prints.
"""
from __future__ import annotations

import time

import jax
from absl import logging


def _clock(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """``Progress('extract', total=n).update(done)`` logs ``extract 40% 400/1000 ETA 00:12``."""

  def __init__(self, name: str, total: int, every_seconds: float = 10.0):
    self.name, self.total, self.every = name, max(int(total), 1), every_seconds
    self.start = self.last = time.perf_counter()
    self.done = 0

  def update(self, done: int) -> None:
    self.done = done
    now = time.perf_counter()
    if done < self.total and now - self.last < self.every:
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed / done * (self.total - done) if done else float("nan")
    if jax.process_index() == 0:
      logging.info("%s %3d%% %d/%d elapsed %s ETA %s", self.name, 100 * done // self.total,
                   done, self.total, _clock(elapsed),
                   _clock(eta) if eta == eta else "?")
