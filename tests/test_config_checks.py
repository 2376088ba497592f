"""Every config mistake is caught before any compute, in one sentence naming field and fix."""
import os

import numpy as np
import pytest

from conftest import test_config
from deeper_jax import config_checks
from deeper_jax.errors import ConfigError
from deeper_jax.train import loop
from deeper_jax.train import step as step_lib


@pytest.mark.parametrize("overrides,match", [
    ({"data.name": "imagenet21k"}, r"config\.data\.name='imagenet21k' must be one of"),
    ({"model.name": "resnet9000"}, r"config\.model\.name='resnet9000' must be one of"),
    ({"data.data_dir": "/no/such/folder"}, r"data_dir='/no/such/folder' is not an existing folder"),
    ({"train.batch_size": 60}, r"batch_size=60 does not split over the 8 super-classes"),
    ({"method.num_rotations": 3}, r"num_rotations=3 must be one of \(1, 4\)"),
    ({"method.loss": "triplet"}, r"config\.method\.loss='triplet' must be one of"),
    ({"clustering.pca_dim": 1000}, r"pca_dim=1000 must be ≤ the feature size 64"),
    ({"train.learning_rate": float("nan")}, r"learning_rate=nan must be a finite number"),
    ({"train.learning_rate": -0.1}, r"learning_rate=-0.1 must be > 0"),
    ({"clustering.num_iters": -1}, r"num_iters=-1 must be ≥ 0"),
    ({"eval.probe_layers": "conv99"}, r"probe_layers='conv99' is not a layer of small_cnn28"),
    ({"eval.paper_layers": "conv3"}, r"paper_layers='conv3' is not a layer .* conv1_1"),
    ({"eval.evaluators": "probe,nmi"}, r"evaluators names 'nmi', not an evaluator"),
    ({"train.crop_scale": (0.5, 0.1)}, r"crop_scale=\(0\.5, 0\.1\) must satisfy"),
    ({"model.dropout": 1.0}, r"dropout=1\.0 must be < 1\.0"),
    ({"data.load_size": 20}, r"load_size=20 is smaller than config\.data\.image_size=28"),
    ({"data.image_size": 4}, r"image_size=4 .*raise"),
    ({"model.std": (0.0,)}, r"std=\(0\.0,\) must hold positive numbers"),
    ({"train.init_from": "/no/such/run"}, r"init_from='/no/such/run' does not exist"),
    ({"data.workers": -1}, r"config\.data\.workers=-1 must be ≥ 0"),
    ({"data.worker_kind": "fibers"}, r"worker_kind='fibers' must be one of \('auto', "),
    ({"data.prefetch": 0}, r"config\.data\.prefetch=0 must be ≥ 1"),
    ({"clustering.memory_budget_gb": -1.0}, r"memory_budget_gb=-1\.0 must be ≥ 0"),
    ({"clustering.memory_budget_gb": 0.5, "clustering.init": "kmeans++"},
     r"memory_budget_gb=0\.5 streams spilled features, which k-means\+\+ cannot"),
])
def test_a_bad_field_is_named_with_its_fix(overrides, match):
  with pytest.raises(ConfigError, match=match) as error:
    config_checks.check_config(test_config("tiny", **overrides), num_devices=1)
  assert "\n" not in str(error.value)


def test_a_batch_that_does_not_split_over_the_devices():
  # 8 super-classes × 3 images on 16 devices: the data axis of 2 cannot split 3.
  with pytest.raises(ConfigError, match=r"24 gives 3 images per super-class, which does "
                                        r"not split over the 2 devices"):
    config_checks.check_config(test_config("tiny", **{"train.batch_size": 24,
                                                      "method.rotnet_warmup_epochs": 0}),
                               num_devices=16)


def test_the_rotnet_warmup_phase_is_checked_too():
  # R = 1, m = 3: the clustering phase has S = 3 slices, the RotNet warm-up S = 4.
  overrides = {"method.num_rotations": 1, "method.num_super_clusters": 3, "train.batch_size": 15}
  config_checks.check_config(
      test_config("tiny", **overrides, **{"method.rotnet_warmup_epochs": 0}), num_devices=1)
  with pytest.raises(ConfigError, match="15 does not split over the 4 super-classes of the "
                                        "rotnet_warmup phase"):
    config_checks.check_config(test_config("tiny", **overrides), num_devices=1)


def test_unknown_and_missing_fields():
  config = test_config("tiny")
  with config.unlocked():
    config.model.widht = 3
  with pytest.raises(ConfigError, match=r"config\.model\.widht is not a field deeper_jax knows "
                                        r"\(did you mean config\.model\.width\?\)"):
    config_checks.check_config(config, num_devices=1)
  config = test_config("tiny")
  del config.eval["knn_k"]
  with pytest.raises(ConfigError, match=r"config\.eval\.knn_k is missing"):
    config_checks.check_config(config, num_devices=1)


def test_every_shipped_config_passes():
  for name in ("default", "tiny", "rotnet", "deepcluster", "deepercluster", "image_folder",
               "paper_vgg16_yfcc", "rotnet_vgg16_yfcc"):
    config = test_config(name)
    if config.data.name == "image_folder":
      config.data.data_dir = os.path.dirname(__file__)  # any existing folder
    if config.model.name == "vgg16_bn":
      config_checks.check_fields(config)  # the full structure check builds VGG at 224 px
    else:
      config_checks.check_config(config, num_devices=1)


def test_more_clusters_than_images_is_caught_once_the_data_is_indexed(tmp_path):
  config = test_config("tiny", **{"data.max_train_images": 16, "method.num_sub_clusters": 10})
  with pytest.raises(ConfigError, match=r"2×10=20 clusters but the training set has only 16 "
                                        r"images; lower config\.method\.num_sub_clusters"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing was started


class FirstStep(Exception):
  """Raised instead of the first train step: the run got that far without an error."""


def _numeric_fields(config) -> list[str]:
  return [name for name in config_checks.leaf_fields(config)
          if isinstance(config_checks._get(config, name), (int, float))
          and not isinstance(config_checks._get(config, name), bool)]


def _draw(rng: np.random.Generator, value):
  """A random value of the same type: a valid-looking one or a typical mistake."""
  kind = rng.integers(6)
  if isinstance(value, int):
    return int([-1, 0, 1, value * 2, 10**9, int(rng.integers(0, 100))][kind])
  return float([-1.0, 0.0, float("nan"), float("inf"), value * 10, rng.uniform(0, 1)][kind])


# Fields read before the first train step; the others (optimiser, logging, checkpoint
# cadence, evaluation) are read later, and for them the check alone is exercised.
PRE_STEP = ("seed", "data.", "model.", "method.", "clustering.", "train.batch_size")


def test_fuzz_every_numeric_field_fails_with_one_line_or_reaches_the_first_step(
    tmp_path, monkeypatch):
  """Issue 16.7: a random value in any numeric field either gives a one-line ConfigError
  before any compute or a run that gets to its first train step without another error."""
  def stop_at_first_step(*args, **kwargs):
    def step(*_):
      raise FirstStep()
    return step
  monkeypatch.setattr(step_lib, "make_train_step", stop_at_first_step)
  base = {"data.max_train_images": 256, "method.rotnet_warmup_epochs": 0,
          "eval.evaluators": "clusters"}
  fields = _numeric_fields(test_config("tiny"))
  assert len(fields) > 40
  rng = np.random.default_rng(0)
  outcomes = {"rejected": 0, "accepted": 0, "reached the first step": 0}
  for i, field in enumerate(fields):
    value = _draw(rng, config_checks._get(test_config("tiny"), field))
    config = test_config("tiny", **{**base, field: value})
    try:
      if field.startswith(PRE_STEP):
        loop.train_and_evaluate(config, str(tmp_path / f"run{i}"))
      else:
        config_checks.check_config(config, num_devices=1)
        outcomes["accepted"] += 1
        continue
    except ConfigError as e:
      message = str(e)
      assert "\n" not in message and "config." in message, (field, value, message)
      outcomes["rejected"] += 1
    except FirstStep:
      outcomes["reached the first step"] += 1
    else:
      raise AssertionError(f"{field}={value!r}: the run neither failed nor reached a step")
  assert min(outcomes.values()) > 3, outcomes
