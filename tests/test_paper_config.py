"""configs/paper_vgg16_yfcc.py is the reference's settings (and configs/rotnet_vgg16_yfcc.py
the RotNet it starts from); one real step of the paper's network at toy size."""
import math

import jax
import numpy as np
import pytest

from configs import paper_vgg16_yfcc, rotnet_vgg16_yfcc
from deeper_jax import config_checks, models
from deeper_jax.data import sampler
from deeper_jax.extract import features as features_lib
from deeper_jax.runtime import mesh as mesh_lib
from deeper_jax.train import schedule
from deeper_jax.train import state as state_lib
from deeper_jax.train import step as step_lib


@pytest.fixture
def paper():
  return paper_vgg16_yfcc.get_config()


def test_method_is_deepercluster_with_320k_clusters(paper):
  method = paper.method
  assert (method.num_rotations, method.num_super_clusters) == (4, 4)
  assert (method.num_sub_clusters, method.loss) == (80_000, "hierarchical")
  assert method.num_super_clusters * method.num_sub_clusters == 320_000
  assert schedule.num_super_classes(method) == 16


def test_optimisation_is_the_references(paper):
  train = paper.train
  assert train.batch_size == 3072  # 64 GPUs × 48 = 16 super-classes × 192
  assert (train.learning_rate, train.weight_decay, train.momentum) == (0.1, 1e-5, 0.9)
  assert train.epochs_per_cycle == 3
  assert train.num_cycles * train.epochs_per_cycle >= 100


def test_network_and_initialisation_are_the_references(paper):
  model = paper.model
  assert (model.name, model.width, model.feature_dim) == ("vgg16_bn", 64, 4096)
  assert model.sobel and not model.folded_sobel and model.dropout == 0.5
  assert model.fc_init == "torch" and paper.method.head_init == "torch"
  assert paper.method.sub_head_grad == "per_group"


def test_augmentation_is_random_resized_crops_of_224_from_256(paper):
  assert (paper.data.image_size, paper.data.load_size, paper.data.channels) == (224, 256, 3)
  assert paper.train.crop == "random_resized"
  assert tuple(paper.train.crop_scale) == (0.08, 1.0)
  np.testing.assert_allclose(paper.train.crop_ratio, (3 / 4, 4 / 3))


def test_training_starts_from_a_rotnet(paper):
  assert paper.method.rotnet_warmup_epochs > 0 or paper.train.init_from
  warmup, clustering = schedule.phases(paper)
  assert warmup.name == schedule.WARMUP and schedule.num_super_classes(warmup.method) == 4
  assert clustering.method.num_super_clusters == 4


def test_clustering_whitens_the_4096_d_features_without_reduction(paper):
  assert paper.clustering.pca_dim == paper.model.feature_dim == 4096
  assert paper.clustering.num_iters == 10


@pytest.mark.parametrize("num_images", [1, 3071, 3072, 3073, 95_920_149])
def test_an_epoch_is_n_images(paper, num_images):
  method = paper.method
  per_super = paper.train.batch_size // schedule.num_super_classes(method)
  steps = sampler.steps_per_epoch(num_images, num_super_clusters=method.num_super_clusters,
                                  num_rotations=method.num_rotations,
                                  batch_per_super=per_super)
  assert steps == math.ceil(num_images / 3072)


def test_the_paper_probe_reads_conv13(paper):
  assert "probe_paper" in paper.eval.evaluators.split(",")
  model = models.build_backbone(paper.model)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                             jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
  _, _, convs = features_lib.layer_shapes(model, variables, 224, 3)
  assert len(convs) == 13 and list(convs)[12] == "conv5_3"
  assert paper.eval.paper_layers == "conv5_3" and convs["conv5_3"] == (14, 14, 512)


def test_paper_config_passes_every_check_on_64_devices(paper):
  config_checks.check_fields(paper)
  config_checks.check_config(paper, num_devices=64)
  # 64 GPUs → 16 super-class groups of 4; each group's batch slice splits over them.
  assert mesh_lib.mesh_shape(16, 64) == (16, 4)


def test_rotnet_config_is_the_paper_setting_with_rotations_only(paper):
  rotnet = rotnet_vgg16_yfcc.get_config()
  config_checks.check_fields(rotnet)
  config_checks.check_config(rotnet, num_devices=64)
  m = rotnet.method
  assert (m.num_rotations, m.num_super_clusters, m.num_sub_clusters) == (4, 1, 1)
  assert m.rotnet_warmup_epochs == 0
  (only,) = schedule.phases(rotnet)
  assert schedule.num_super_classes(only.method) == 4
  for section in ("data", "model"):
    assert rotnet[section].to_dict() == paper[section].to_dict()
  for field in ("batch_size", "learning_rate", "weight_decay", "momentum", "crop"):
    assert rotnet.train[field] == paper.train[field]


def test_paper_config_shrunk_to_toy_size_runs_a_step_on_cpu(paper):
  from sklearn.datasets import load_sample_images
  config = paper
  config.data.image_size = 32
  config.data.load_size = 40       # random-resized crops of 32 from 40, as 224 from 256
  config.model.width = 8           # VGG-16 structure, 1/8 of the channels
  config.model.feature_dim = 32
  config.method.num_sub_clusters = 3
  config.clustering.pca_dim = 16
  config.train.batch_size = 32     # 16 super-classes × 2
  config.eval.paper_layers = "conv5_3"
  config_checks.check_config(config, num_devices=1)
  num_super = 16
  photos = np.stack([p[y:y + 40, x:x + 40] for p in load_sample_images().images
                     for y in range(0, 320, 80) for x in range(0, 320, 80)])
  images = photos[:32].reshape(num_super, 2, 40, 40, 3)
  sub_labels = np.arange(32, dtype=np.int32).reshape(num_super, 2) % 3

  mesh = mesh_lib.make_mesh(num_super)
  model = models.build_backbone(config.model)
  tx = step_lib.make_optimizer(config.train)
  variables = state_lib.init_variables(model, config, channels=3)
  state = state_lib.start_phase(variables, 0, config, config.method, tx, tx, phase=1)
  assert state.heads["W"]["kernel"].shape == (16, 32, 3)
  shardings = step_lib.state_shardings(state, mesh)
  step = step_lib.make_train_step(model, tx, tx, method=config.method,
                                  train_config=config.train, image_size=32, mesh=mesh,
                                  state_sharding=shardings)
  before = jax.device_get(state.params)
  state, metrics = step(jax.device_put(state, shardings),
                        {"images": images, "sub_labels": sub_labels}, jax.random.key(0))
  assert int(state.step) == 1
  # ln 16 + ln 3 at init: the heads start near uniform.
  np.testing.assert_allclose(float(metrics["loss"]), np.log(16) + np.log(3), rtol=0.05)
  moved = jax.tree_util.tree_leaves_with_path(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before))
  kernels = [m for path, m in moved if path[-1].key == "kernel"]
  assert len(kernels) == 15 and min(kernels) > 0  # every layer of the backbone learns
