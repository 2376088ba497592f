"""The default method at toy size: end to end in about a minute, for tests and notebooks.

  python -m deeper_jax.main --config configs/tiny.py --workdir runs/tiny

2048 long-tailed Fashion-MNIST images: 1 RotNet epoch (32 steps of 4 × 16), then 2
cycles of 2 epochs (32 steps of 8 super-classes × 8 each): 160 steps.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "fashion_mnist_longtail"  # no clutter to build: a faster start
  config.data.max_train_images = 2048
  config.model.width = 8
  config.model.feature_dim = 64
  config.method.num_super_clusters = 2
  config.method.num_sub_clusters = 4
  config.method.rotnet_warmup_epochs = 1
  config.clustering.pca_dim = 16
  config.clustering.pca_sample_size = 2048
  config.train.batch_size = 64          # 8 super-classes × 8
  config.train.num_cycles = 2
  config.train.epochs_per_cycle = 2
  config.train.log_every_steps = 16
  config.checkpoint.every_steps = 50
  config.eval.probe_max_train_images = 2000
  config.eval.probe_max_test_images = 1000
  config.eval.probe_epochs = 5
  config.eval.paper_epochs = 1
  config.eval.paper_max_train_images = 2000
  config.eval.paper_max_test_images = 1000
  config.eval.finetune_steps = 30
  config.eval.clusters_k = 8
  return config
