"""A config that cannot work fails at once, with one sentence naming field and fix."""
import os

import pytest

from configs import tiny
from deeper_jax import config_checks, train
from deeper_jax.config_checks import ConfigError


def _config(**overrides):
  config = tiny.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return config


@pytest.mark.parametrize("overrides,match", [
    ({"data__name": "imagenet21k"}, r"config\.data\.name='imagenet21k' is not a known dataset"),
    ({"model__name": "resnet9000"}, r"config\.model\.name='resnet9000' is not a known model"),
    ({"data__data_dir": "/no/such/folder"}, r"config\.data\.data_dir='/no/such/folder' does not exist"),
    ({"train__batch_size": 60}, r"config\.train\.batch_size=60 does not split over the 8 super-classes"),
    ({"method__num_rotations": 3}, r"config\.method\.num_rotations=3 must be 1 .* or 4"),
    ({"method__loss": "triplet"}, r"config\.method\.loss='triplet' is unknown"),
    ({"clustering__pca_dim": 1000}, r"config\.clustering\.pca_dim=1000 must be in"),
    ({"clustering__dot": "fp8"}, r"config\.clustering\.dot='fp8' is unknown; use one of"),
])
def test_bad_static_config_names_the_field(overrides, match):
  with pytest.raises(ConfigError, match=match):
    config_checks.check_static(_config(**overrides), num_devices=1)


def test_batch_that_does_not_split_over_devices():
  # 8 super-classes × 4 images on 16 devices: a data axis of 2 cannot split 4? it can;
  # 8 × 3 images on 16 devices: the data axis of 2 cannot split 3.
  with pytest.raises(ConfigError, match=r"24 gives 3 images per super-class, which does "
                                        r"not split over the 2 devices"):
    config_checks.check_static(_config(train__batch_size=24), num_devices=16)


def test_more_clusters_than_images():
  config = _config(method__num_sub_clusters=600)  # 2 × 600 > 1000
  with pytest.raises(ConfigError, match=r"1200 clusters but the training set has only "
                                        r"1000 images; lower config\.method\.num_sub_clusters"):
    config_checks.check_against_data(config, 1000)


@pytest.mark.parametrize("overrides,match", [
    ({"data__max_train_images": 16, "method__num_sub_clusters": 10}, "clusters but the training set has only 16"),
    ({"model__name": "nope"}, "is not a known model"),
    ({"data__data_dir": "/missing/images"}, "does not exist"),
])
def test_train_fails_before_any_compute(tmp_path, overrides, match):
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(_config(**overrides), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing was started
