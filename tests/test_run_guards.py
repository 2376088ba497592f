"""A run refuses what would silently corrupt it: another config's workdir, NaNs."""

import numpy as np
import pytest

from configs import tiny
from deeper_jax import checkpointing, pretrained, train


def test_a_workdir_written_by_another_config_refuses_to_resume(tmp_path):
  config = tiny.get_config()
  checkpointing.check_resumable(str(tmp_path), config)
  checkpointing.check_resumable(str(tmp_path), config)  # same config: fine
  other = tiny.get_config()
  other.method.num_sub_clusters = 7
  other.train.learning_rate = 0.5
  other.checkpoint.every_steps = 10   # cadence may change freely
  with pytest.raises(ValueError) as error:
    checkpointing.check_resumable(str(tmp_path), other)
  message = str(error.value)
  assert "method.num_sub_clusters: 4 in the workdir, 7 now" in message
  assert "train.learning_rate: 0.05 in the workdir, 0.5 now" in message
  assert "checkpoint" not in message.split("(")[1]
  assert "use a new --workdir or the original config" in message


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny.get_config()
  config.data.max_train_images = 512
  config.train.num_cycles = 1
  config.train.learning_rate = 1e30
  config.train.log_every_steps = 4
  config.checkpoint.every_steps = 4
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"non-finite loss \((nan|inf|-inf)\) at step \d+; "
                                               r"the last good checkpoint"):
    train.train_and_evaluate(config, workdir)
  state = pretrained._latest_state(workdir)
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state["params"])]
  assert all(np.isfinite(x).all() for x in leaves)
