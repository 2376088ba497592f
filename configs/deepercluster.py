"""DeeperCluster as in the paper (m = 4 super-clusters, recluster every 3 epochs).

  python -m deeper_jax.main --config configs/deepercluster.py --workdir runs/deepercluster

The default config is DeeperCluster already, at CPU demo size; this variant follows the
paper's schedule (T = 3) and uses more sub-clusters (4 × 32), for a longer CPU/GPU run.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.method.num_super_clusters = 4
  config.method.num_sub_clusters = 32
  config.train.num_cycles = 4
  config.train.epochs_per_cycle = 3
  return config
