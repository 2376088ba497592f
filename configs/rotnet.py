"""RotNet (Gidaris et al. 2018): predict the rotation only — m = 1, k_sub = 1, no clustering.

  python -m deeper_jax.main --config configs/rotnet.py --workdir runs/rotnet

Same code as DeeperCluster: with one super-cluster and one sub-cluster the sub-loss is
identically zero and the super-classes are the 4 rotations. Same sample budget as the
default (24 epochs of N images).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.method.num_rotations = 4
  config.method.num_super_clusters = 1
  config.method.num_sub_clusters = 1
  config.method.rotnet_warmup_epochs = 0
  config.train.batch_size = 256         # 4 rotations × 64
  config.train.num_cycles = 1
  config.train.epochs_per_cycle = 24
  return config
