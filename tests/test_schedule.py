"""The run's phases: an optional RotNet warm-up (the paper's start), then clustering
cycles of the configured method."""
import pytest

from conftest import test_config
from deeper_jax import config_checks
from deeper_jax.errors import ConfigError
from deeper_jax.train import schedule


def test_warm_up_then_clustering_when_warm_up_epochs_are_set():
  config = test_config("default", **{"method.rotnet_warmup_epochs": 3})
  warmup, clustering = schedule.phases(config)
  assert warmup.name == schedule.WARMUP and clustering.name == schedule.CLUSTERING
  assert (warmup.method.num_rotations, warmup.method.num_super_clusters,
          warmup.method.num_sub_clusters) == (4, 1, 1)
  assert warmup.method.loss == "hierarchical"
  assert (warmup.num_cycles, warmup.epochs_per_cycle) == (1, 3)
  assert schedule.num_super_classes(warmup.method) == 4  # batches laid out [4, b]
  assert clustering.method is config.method
  assert (clustering.num_cycles, clustering.epochs_per_cycle) == (
      config.train.num_cycles, config.train.epochs_per_cycle)
  assert schedule.num_super_classes(clustering.method) == 4 * config.method.num_super_clusters


def test_no_warm_up_phase_when_its_epochs_are_zero():
  config = test_config("default", **{"method.rotnet_warmup_epochs": 0})
  (only,) = schedule.phases(config)
  assert only.name == schedule.CLUSTERING and only.method is config.method


def test_the_warm_up_keeps_the_methods_other_settings_and_leaves_it_unchanged():
  config = test_config("default", **{"method.head_init": "normal",
                                     "method.sub_head_grad": "global_mean",
                                     "method.loss": "flat", "method.rotnet_warmup_epochs": 2})
  before = config.method.to_dict()
  warmup, _ = schedule.phases(config)
  assert (warmup.method.head_init, warmup.method.sub_head_grad) == ("normal", "global_mean")
  assert warmup.method.loss == "hierarchical" and warmup.method.rotnet_warmup_epochs == 0
  assert config.method.to_dict() == before


@pytest.mark.parametrize("base", ["default", "tiny", "deepercluster", "deepcluster", "rotnet"])
def test_shipped_configs_split_their_batch_over_every_phase(base):
  config = test_config(base)
  config_checks.check_config(config, num_devices=1)
  for phase in schedule.phases(config):
    assert config.train.batch_size % schedule.num_super_classes(phase.method) == 0


def test_a_batch_that_does_not_split_over_the_warm_up_is_refused():
  # 6 images split over the S = 1·2 super-classes of the method, not over the
  # warm-up's 4 rotations.
  config = test_config("tiny", **{"method.num_rotations": 1, "method.num_super_clusters": 2,
                                  "train.batch_size": 6})
  with pytest.raises(ConfigError, match="rotnet_warmup phase"):
    config_checks.check_config(config, num_devices=1)
