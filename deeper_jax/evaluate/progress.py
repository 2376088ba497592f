"""Progress lines with an ETA for the long phases of an evaluation.

Extraction over a large source, a dozen linear probes or a fine-tuning run can
take minutes to hours; a log line every few seconds that says how far it got
and when it will end is what tells a user whether to wait or to stop it.
"""
from __future__ import annotations

import time

from absl import logging


def format_seconds(seconds: float) -> str:
  """``73.2`` -> ``'1m13s'``; short and readable in a log line."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class Progress:
  """Counts work done out of ``total`` and logs ``name: done/total, ETA``.

  Logs at most once every ``every_s`` seconds (plus the final line), so that
  calling ``update`` once per batch costs nothing noticeable.
  """

  def __init__(self, name: str, total: int, *, unit: str = "",
               every_s: float = 10.0):
    self.name = name
    self.total = max(int(total), 0)
    self.unit = unit
    self.every_s = every_s
    self.done = 0
    self.start = time.perf_counter()
    self._last_log = self.start

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def eta(self) -> float | None:
    """Seconds left at the average rate so far; None before any work."""
    if self.done <= 0:
      return None
    return self.elapsed / self.done * max(self.total - self.done, 0)

  def line(self) -> str:
    pct = 100.0 * self.done / self.total if self.total else 100.0
    eta = self.eta()
    eta_text = "?" if eta is None else format_seconds(eta)
    unit = f" {self.unit}" if self.unit else ""
    return (f"{self.name}: {self.done}/{self.total}{unit} ({pct:.0f}%), "
            f"elapsed {format_seconds(self.elapsed)}, ETA {eta_text}")

  def update(self, amount: int = 1) -> None:
    self.done += amount
    now = time.perf_counter()
    if self.done >= self.total or now - self._last_log >= self.every_s:
      self._last_log = now
      logging.info("%s", self.line())
