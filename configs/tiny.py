"""The default method at toy size: end to end in about a minute, for tests and notebooks.

  python -m deeper_jax.main --config configs/tiny.py --workdir runs/tiny
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.max_train_images = 2048
  config.data.download = False
  config.model.width = 8
  config.model.feature_dim = 64
  config.method.num_super_clusters = 2
  config.method.num_sub_clusters = 4
  config.clustering.pca_dim = 16
  config.clustering.pca_sample_size = 2048
  config.train.batch_size = 64          # 8 super-classes × 8
  config.train.num_cycles = 2
  config.train.epochs_per_cycle = 1     # 2048·4/64 = 128 steps per epoch
  config.train.log_every_steps = 32
  config.checkpoint.every_steps = 50
  config.eval.probe_max_train_images = 2000
  config.eval.probe_max_test_images = 1000
  config.eval.probe_epochs = 5
  config.eval.finetune_steps = 30
  return config
