"""deeper_jax entry point: flags and one call per mode.

  python -m deeper_jax.main --config configs/default.py --workdir runs/demo
  python -m deeper_jax.main --mode eval   --config configs/default.py --workdir runs/demo
  python -m deeper_jax.main --mode export --config configs/default.py --workdir runs/demo

``train`` pre-trains (resuming from the workdir when it holds a checkpoint) and writes
``results.json``; ``eval`` runs the full evaluation suite on the workdir's newest
checkpoint or an export; ``export`` writes the Sobel-folded backbone to
``<workdir>/export`` for ``deeper_jax.load_pretrained``.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Config files import each other as ``configs.*``: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() "
                  "(coordinator from SLURM/MPI/TPU or JAX_COORDINATOR_ADDRESS).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  from deeper_jax import log_filter
  log_filter.install()
  if FLAGS.distributed:
    import jax
    jax.distributed.initialize()
  from deeper_jax import modes  # after flags: importing jax reads XLA flags
  modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
