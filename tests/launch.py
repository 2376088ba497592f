"""``python -m deeper_jax.main`` with deterministic crash injection, for the resume tests.

  DEEPER_JAX_KILL_AT=<point>:<count>[:<signal>] python tests/launch.py --config ... --workdir ...

The process sends itself ``signal`` (default SIGKILL: no cleanup, no atexit, like an
OOM kill or a lost node) when it reaches ``point`` for the ``count``-th time in this
process: ``extract`` (a feature-extraction step), ``kmeans`` (a Lloyd iteration),
``step`` (a train step; ``count`` is the global step number) or ``save`` (while Orbax
writes checkpoint ``count``, as soon as its temporary folder exists). E.g.
``step:40:SIGTERM`` is a preemption notice at step 40. The hooks wrap package
functions from outside; the package itself knows nothing of them. With
``--distributed`` each process takes its own ``DEEPER_JAX_KILL_AT`` (or none).
"""
import itertools
import os
import signal
import threading
import time

from absl import app

ENV = "DEEPER_JAX_KILL_AT"


def _spec():
  parts = os.environ[ENV].split(":")
  return parts[0], int(parts[1]), getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGKILL


def _kill(signum) -> None:
  os.kill(os.getpid(), signum)


def install(point: str, at: int, signum) -> None:
  """Wraps the function behind ``point`` so that its ``at``-th event sends ``signum``."""
  counter = itertools.count(1)
  if point == "extract":
    from deeper_jax.extract import features

    def counting(original):
      def wrapped(*args, **kwargs):
        inner = kwargs.pop("on_batch", None)

        def on_batch(done):
          if inner is not None:
            inner(done)
          if next(counter) == at:
            _kill(signum)
        return original(*args, on_batch=on_batch, **kwargs)
      return wrapped
    features.map_batches = counting(features.map_batches)
    features.map_rows = counting(features.map_rows)
  elif point == "kmeans":
    from deeper_jax.cluster import hierarchical
    original = hierarchical.kmeans

    def kmeans(*args, **kwargs):
      kwargs["progress"] = lambda *_: next(counter) == at and _kill(signum)
      return original(*args, **kwargs)
    hierarchical.kmeans = kmeans
  elif point == "step":
    from deeper_jax.train import step as step_lib
    original = step_lib.make_train_step

    def make_train_step(*args, **kwargs):
      train_step = original(*args, **kwargs)

      def wrapped(state, batch, rng):
        state, metrics = train_step(state, batch, rng)
        if int(state.step) == at:
          _kill(signum)
        return state, metrics
      return wrapped
    step_lib.make_train_step = make_train_step
  elif point == "save":
    from deeper_jax.runtime import checkpoints
    original = checkpoints.Checkpointer.save

    def save(self, state, clusters, progress):
      latest = self.latest()
      if (0 if latest is None else latest + 1) == at:
        def watch():
          while True:
            if any(name.startswith(f"{at}.") and "tmp" in name
                   for name in os.listdir(self.directory)):
              _kill(signum)
            time.sleep(0.0005)
        threading.Thread(target=watch, daemon=True).start()
      return original(self, state, clusters, progress)
    checkpoints.Checkpointer.save = save
  else:
    raise ValueError(f"{ENV}: unknown point {point!r}")


if __name__ == "__main__":
  from deeper_jax import main
  if os.environ.get(ENV):
    install(*_spec())
  app.run(main.main, flags_parser=main.parse_flags)
