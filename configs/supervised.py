"""The supervised upper bound: the default network and budget, trained on the classes.

  python -m deeper_jax.main --config configs/supervised.py --workdir runs/supervised

The training set's own labels replace the clusters (``method.targets='labels'``: one
super-cluster, one sub-class per class, batches uniform over classes), no rotation task,
no RotNet start; unlabelled images (-1, the clutter of the uncurated set) are never
sampled. Same 24 epochs of N samples as the default; the evaluators are the same.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.method.targets = "labels"
  config.method.num_rotations = 1
  config.method.num_super_clusters = 1
  config.method.num_sub_clusters = 10   # Fashion-MNIST's classes
  config.method.rotnet_warmup_epochs = 0
  config.train.num_cycles = 1
  config.train.epochs_per_cycle = 24
  return config
