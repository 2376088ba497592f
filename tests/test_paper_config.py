"""configs/paper_vgg16_yfcc.py: the paper's settings, and one real step at toy size."""
import jax
import numpy as np

from configs import paper_vgg16_yfcc
from deeper_jax import config_checks, models, parallel
from deeper_jax import state as state_lib
from deeper_jax import train_step as step_lib


def test_paper_config_holds_the_papers_numbers():
  config = paper_vgg16_yfcc.get_config()
  method, train = config.method, config.train
  assert (method.num_rotations, method.num_super_clusters) == (4, 4)
  assert method.num_super_clusters * method.num_sub_clusters == 320_000
  assert (config.data.image_size, train.batch_size) == (224, 3072)
  assert (train.learning_rate, train.weight_decay, train.momentum) == (0.1, 1e-5, 0.9)
  assert train.epochs_per_cycle == 3 and config.model.name == "vgg16_bn"
  assert config.model.sobel and config.model.dropout == 0.5
  # 64 GPUs → 16 super-class groups of 4; each group's batch slice splits over them.
  config_checks.check_static(config, num_devices=64)
  assert parallel.mesh_shape(16, 64) == (16, 4)


def test_paper_config_shrunk_to_toy_size_runs_a_step_on_cpu():
  from sklearn.datasets import load_sample_images
  config = paper_vgg16_yfcc.get_config()
  config.data.image_size = 32
  config.model.width = 8           # VGG-16 structure, 1/8 of the channels
  config.model.feature_dim = 32
  config.method.num_sub_clusters = 3
  config.clustering.pca_dim = 16
  config.train.batch_size = 32     # 16 super-classes × 2
  config_checks.check_static(config, num_devices=1)
  num_super = 16
  photos = np.stack([p[y:y + 32, x:x + 32] for p in load_sample_images().images
                     for y in range(0, 256, 64) for x in range(0, 256, 64)])
  images = photos[:32].reshape(num_super, 2, 32, 32, 3)
  sub_labels = np.arange(32, dtype=np.int32).reshape(num_super, 2) % 3

  mesh = parallel.make_mesh(num_super)
  model = models.build_backbone(config.model)
  tx = step_lib.make_optimizer(config.train)
  state = state_lib.initial_state(model, config, (32, 32, 3), tx, tx, 32)
  assert state.heads["W"]["kernel"].shape == (16, 32, 3)
  shardings = step_lib.state_shardings(state, mesh)
  step = step_lib.make_train_step(model, tx, tx, num_rotations=4, loss="hierarchical",
                                  crop_pad=config.train.crop_pad, mesh=mesh,
                                  state_sharding=shardings)
  before = jax.device_get(state.params)
  state, metrics = step(jax.device_put(state, shardings),
                        {"images": images, "sub_labels": sub_labels}, jax.random.key(0))
  assert int(state.step) == 1
  # ln 16 + ln 3 at init: heads start near uniform.
  np.testing.assert_allclose(float(metrics["loss"]), np.log(16) + np.log(3), rtol=0.05)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       state.params, before)
  assert max(jax.tree.leaves(moved)) > 0
