"""DeeperCluster with more clusters and a longer schedule than the CPU default.

  python -m deeper_jax.main --config configs/deepercluster.py --workdir runs/deepercluster

m = 4 super-clusters × 32 sub-clusters, recluster every 3 epochs (paper: T = 3), 6 RotNet
epochs then 14 cycles: 48 epochs of N images, twice the default's budget.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.method.num_super_clusters = 4
  config.method.num_sub_clusters = 32
  config.method.rotnet_warmup_epochs = 6
  config.train.num_cycles = 14
  config.train.epochs_per_cycle = 3
  return config
