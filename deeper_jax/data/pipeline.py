"""The input pipeline: an epoch plan's batches decoded ahead of the train step, in order.

The sampler's plan (``sampler.epoch_plan``: ``int32 [steps, S, b]``) stays the one
source of truth for *which* images a step trains on; this module only decides *when*
and *where* they are decoded. Step ``i``'s element is a pure function of
``(source, plan[i], blocks)``, so the pipeline started at step ``i`` yields exactly
the batches ``plan[i:]`` of the synchronous path, bit for bit, whatever the workers
(a resumed run replays its epoch exactly).

Each process decodes only its own rows: ``blocks`` lists the ``[S, b]`` index blocks
of this process's devices (:func:`local_blocks`), and an element is the tuple of their
``uint8 [s, b', H, W, C]`` images. ``loop.device_batch`` then assembles the global
array from them. Feature extraction (extract/features.py) reads through the same
pipeline: its plan is ``[batches, devices, rows per device]`` in the order it computes
rows, so decoding runs ahead of the forward passes there too (:class:`Decode`).

Three ways to decode (``config.data.workers`` / ``worker_kind``), decided per source:

* ``workers = 0``: in the calling thread when the step asks (the behaviour before this
  module); no prefetch, nothing runs beside the step.
* threads (grain ``ReadOptions``): ``workers`` threads fill a buffer of ``prefetch``
  batches. Right for in-memory sources (Fashion-MNIST, digits): nothing is pickled,
  indexing a numpy array and PIL resizes release the GIL, start-up is free.
* processes (grain ``mp_prefetch``): ``workers`` processes, each decoding every
  ``workers``-th step, interleaved back in plan order. Right for sources that decode
  files (image folders, ArrayRecord shards): JPEG decoding holds the GIL in part, and a
  process keeps it off the train loop's interpreter. grain starts them with
  ``spawn``, never ``fork`` (a forked JAX process can deadlock on XLA's threads), so
  the source is pickled to each worker once per epoch (an image folder: its path list;
  an ArrayRecord source: its shard paths, re-opened in the worker), never per batch.
  Spawned workers import the packages afresh: a few seconds per epoch, noise beside
  the thousands of steps of a real epoch. As with any ``spawn``, a script that starts
  them needs the ``if __name__ == "__main__":`` guard. Batches come back through shared
  memory and are copied into plain arrays; workers exit when their parent is killed.

``auto`` picks processes for sources that decode files, when the read is long enough
to repay their start-up (``AUTO_PROCESS_IMAGES``: a training epoch or an extraction of a
real collection), and threads otherwise (in-memory sources, or a few hundred images
of an evaluator's subset or a small folder).

Image folders find broken files while decoding; in a worker process that copy of the
source learns it, not the run's. So each element also carries the read-time failures
its decode found (index, reason), and the consumer records them on the run's source
(``merge_failures``): the report of skipped files is that of the synchronous path.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from deeper_jax.data.sources import ResizedSource, Source, SubsetSource

WORKER_KINDS = ("auto", "threads", "processes")
# ``auto``: the fewest images a file-decoding read must have to get worker processes.
# Starting 2 spawned workers took 2.4-4 s on this project's 2-core machine
# (benchmarks/input_pipeline.py); 20,000 JPEGs are ~50 s of decoding at the measured
# ~400 images/s per core, so below this the start-up is a large share of the read.
AUTO_PROCESS_IMAGES = 20_000

# An index block over the [S, b] plan of one step: (super-class slice, per-super slice).
Block = tuple[slice, slice]


@dataclasses.dataclass(frozen=True)
class Decode:
  """How a reader's images are decoded: ``config.data.workers``, ``worker_kind``,
  ``prefetch`` (see :func:`batches`). The default decodes in the calling thread."""
  workers: int = 0
  kind: str = "auto"
  prefetch: int = 2

  @classmethod
  def from_config(cls, config) -> "Decode":
    data = config.data
    return cls(int(data.workers), str(data.worker_kind), int(data.prefetch))

  def batches(self, source: Source, plan: np.ndarray, blocks: Sequence["Block"],
              start: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    return batches(source, plan, blocks, start=start, workers=self.workers, kind=self.kind,
                   prefetch=self.prefetch)


def local_blocks(sharding, plan_shape: tuple) -> list[tuple[slice, slice]]:
  """The distinct ``[S, b]`` index blocks of this process's devices, in device order.

  ``sharding``: how the ``[S, b, ...]`` batch is laid out over the devices. What the
  input pipeline decodes for this process: a block two devices share (a replicated
  axis) is read once.
  """
  shape = tuple(plan_shape)[:2]
  keys = []
  for index in sharding.addressable_devices_indices_map(shape).values():
    key = block_key(index, shape)
    if key not in keys:
      keys.append(key)
  return [(slice(*rows), slice(*cols)) for rows, cols in keys]


def block_key(index: tuple, plan_shape: tuple) -> tuple:
  """A block, or a device's index, over an ``[S, b, ...]`` plan as a hashable
  ``((start, stop), (start, stop))``."""
  return tuple(index[axis].indices(plan_shape[axis])[:2] for axis in range(2))


def base_source(source: Source) -> Source:
  """The innermost source behind subset / resize views (the one that decodes)."""
  while isinstance(source, (SubsetSource, ResizedSource)):
    source = source._base  # pylint: disable=protected-access
  return source


def decodes_files(source: Source) -> bool:
  """Whether ``source`` decodes files when read (marked ``decodes_files = True``)."""
  return bool(getattr(base_source(source), "decodes_files", False))


def resolve_kind(kind: str, source: Source, num_images: int | None = None) -> str:
  """``'threads'`` or ``'processes'``. ``auto``: processes for a file-decoding source
  whose read has at least ``AUTO_PROCESS_IMAGES`` images (``None``: a long read)."""
  if kind not in WORKER_KINDS:
    raise ValueError(f"worker kind must be one of {WORKER_KINDS}, got {kind!r}.")
  if kind == "auto":
    long_read = num_images is None or num_images >= AUTO_PROCESS_IMAGES
    return "processes" if decodes_files(source) and long_read else "threads"
  return kind


def _failures(source: Source) -> list:
  """Read-time failures the decoding base has recorded so far ([] if it records none)."""
  return list(getattr(base_source(source), "read_failures", lambda: [])())


def merge_failures(source: Source, failures: Sequence) -> None:
  """Records on ``source``'s base the read failures a worker's copy of it found."""
  if failures:
    base_source(source).record_read_failures(failures)


class StepReader:
  """Random access to the steps ``start ..`` of a plan: element ``k`` = step ``start + k``.

  Element: ``(tuple of uint8 [s, b', H, W, C] per block, new read failures)``. Pickles
  with its source (to worker processes); holds no thread or lock of its own.
  """

  def __init__(self, source: Source, plan: np.ndarray, blocks: Sequence[Block],
               start: int = 0):
    plan = np.asarray(plan)
    if plan.ndim != 3:
      raise ValueError(f"plan must be int [steps, S, b] image indices, got shape {plan.shape}.")
    if not 0 <= start <= len(plan):
      raise ValueError(f"start step {start} is outside the plan's {len(plan)} steps.")
    if not blocks:
      raise ValueError("blocks must list at least one [S, b] index block to decode.")
    self._source, self._plan, self._start = source, plan, int(start)
    self._blocks = tuple((rows, cols) for rows, cols in blocks)
    self._shape = tuple(source.image_shape)
    # Failures already known travel with the source; only new ones go with an element.
    self._seen_failures = len(_failures(source))

  def __len__(self) -> int:
    return len(self._plan) - self._start

  def __getitem__(self, k: int):
    if not 0 <= k < len(self):
      raise IndexError(f"step {self._start + k} is outside the plan's {len(self._plan)} steps.")
    indices = self._plan[self._start + k]
    out = []
    for rows, cols in self._blocks:
      block = indices[rows, cols]
      out.append(self._source.images(block.reshape(-1)).reshape(block.shape + self._shape))
    failures = _failures(self._source)
    new, self._seen_failures = failures[self._seen_failures:], len(failures)
    return tuple(out), new


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """Runs in each worker process: the worker kills itself once its parent is gone.

  A run killed outright (SIGKILL, the OOM killer, a lost node) cannot stop its grain
  workers, and they would wait forever on their full queues, holding the run's
  stdout/stderr open; they poll for their parent instead.
  """
  del worker_index, worker_count

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _absl_flags_parsed() -> None:
  """grain's process workers read absl flags; outside an absl app (tests, benchmarks,
  notebooks) nothing parsed them, so they are marked parsed, at their defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def batches(source: Source, plan: np.ndarray, blocks: Sequence[Block], *, start: int = 0,
            workers: int = 0, kind: str = "auto",
            prefetch: int = 2) -> Iterator[tuple[np.ndarray, ...]]:
  """This process's blocks of every step ``start, start + 1, ..`` of ``plan``, in order.

  Args:
    source: the training source (read only through ``source.images``).
    plan: ``int [steps, S, b]`` image indices, e.g. ``sampler.epoch_plan(...)``.
    blocks: the ``[S, b]`` index blocks this process needs of every step.
    start: the first step (a resumed epoch starts mid-plan).
    workers: 0 = decode in the calling thread as each batch is asked for.
    kind: 'threads', 'processes' or 'auto' (see the module docstring).
    prefetch: batches decoded ahead (workers > 0).

  Yields, per step, one ``uint8 [s, b', H, W, C]`` array per block. Read-time
  failures found in workers are merged into ``source`` before the step is yielded.
  Close the generator (``.close()``, or let it finish) to stop the workers.
  """
  if workers < 0 or prefetch < 1:
    raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers} and {prefetch}.")
  reader = StepReader(source, plan, blocks, start)
  if workers == 0:
    for k in range(len(reader)):
      yield reader[k][0]  # failures are already on `source`: it decoded them itself
    return
  import grain  # pylint: disable=g-import-not-at-top  # only runs that prefetch need it
  dataset = grain.MapDataset.source(reader)
  if resolve_kind(kind, source, num_images=np.asarray(plan)[start:].size) == "threads":
    iterable = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=workers, prefetch_buffer_size=prefetch))
    merge = False  # threads share `source`: failures are already recorded on it
  else:
    _absl_flags_parsed()
    iterable = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers,
                                         per_worker_buffer_size=math.ceil(prefetch / workers)),
            worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    merge = True
  iterator = iter(iterable)
  try:
    for blocks_out, failures in iterator:
      if merge:
        merge_failures(source, failures)
        # Process workers hand over arrays in shared memory, unlinked when collected;
        # plain copies (a few ms a batch) leave nothing for JAX to alias into them.
        blocks_out = tuple(np.array(block) for block in blocks_out)
      yield blocks_out
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
