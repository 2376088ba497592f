"""deeper_jax entry point: flags, then one call per mode (pre-training and evaluation are
two modes of one program, as in BYOL).

  python -m deeper_jax.main --config configs/default.py --workdir runs/demo
  python -m deeper_jax.main --mode eval   --config configs/default.py --workdir runs/demo
  python -m deeper_jax.main --mode export --config configs/default.py --workdir runs/demo

``train`` pre-trains (resuming from the workdir when it holds a checkpoint), then runs
the evaluators of ``config.eval.evaluators`` into ``<workdir>/results.json``; ``eval``
runs them again on the workdir's newest checkpoint (or an export); ``export`` writes the
Sobel-folded backbone to ``<workdir>/export`` for ``deeper_jax.load_pretrained``.

Multi-host: ``--distributed`` calls ``jax.distributed.initialize()``, which finds the
coordinator on SLURM, Open MPI and Cloud TPU, or from ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (docs/scaling.md). Every process runs the
same command; a process that dies stops the others within
``--heartbeat_timeout_seconds``, and launching all of them again resumes the run.

A mistake in the config, the data or the workdir prints one line on stderr and exits
with status 2; a traceback means a bug.
"""
from __future__ import annotations

import os
import sys

# TensorFlow (imported by clu's metric writers) logs INFO lines from C++ at import; a user
# error should read as one line on stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize().")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed).")
flags.DEFINE_integer("num_processes", None, "Processes in the job (--distributed).")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "--distributed: a process silent this long is taken for dead and "
                     "the job stops (JAX's default: 100).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
  """One line on stderr, exit status 2: how every user error ends."""
  print(f"deeper_jax: error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _unknown_override(argv: list[str]) -> str | None:
  from deeper_jax import config_checks  # pylint: disable=g-import-not-at-top
  known = list(config_checks.rules())
  for arg in argv:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      if name not in known:
        return (f"--config.{name} is not a config field"
                f"{config_checks.nearest_field(name, known)}.")
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config mistakes reported as one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a bad --config.* override
    fail(_unknown_override(argv) or f"{type(e).__name__}: {e}")
  return []


def run(mode: str, config, workdir: str):
  """Dispatches one mode; imported lazily so that flags are parsed before jax starts."""
  from deeper_jax.train import loop  # pylint: disable=g-import-not-at-top
  if mode == "train":
    return loop.train_and_evaluate(config, workdir)
  if mode == "eval":
    return loop.evaluate_workdir(config, workdir)
  path = loop.export_workdir(config, workdir)
  logging.info("exported the backbone (Sobel folded) to %s", path)
  return path


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  from deeper_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from deeper_jax.runtime import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_libraries()
  if FLAGS.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    # CPU devices of different processes need a collectives library to all-reduce
    # across them; gloo (over TCP) ships with jaxlib. It is jax's default today;
    # named here so that a CPU job does not depend on that default.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
  try:
    run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except UserError as e:
    fail(str(e))
  except FloatingPointError as e:  # a diverged run: the config's learning rate, not a bug
    fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
