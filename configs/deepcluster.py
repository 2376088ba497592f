"""DeepCluster (Caron et al. 2018): flat k-means pseudo-labels, no rotation.

  python -m deeper_jax.main --config configs/deepcluster.py --workdir runs/deepcluster

One super-cluster, one rotation, k clusters, PCA to 256 (capped at the feature size here),
recluster every epoch. With R = m = 1 the super-loss is identically zero and the single
sub-head is DeepCluster's classifier. An epoch is N images (not 4N): with the default's
6 epochs of 4N samples, this config gets 24 epochs of N to match the sample budget.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.method.num_rotations = 1
  config.method.num_super_clusters = 1
  config.method.num_sub_clusters = 100  # k (reference: 10000 on ImageNet)
  config.clustering.pca_dim = 256       # the reference's PCA size (= feature_dim here)
  config.train.batch_size = 256
  config.train.num_cycles = 24
  config.train.epochs_per_cycle = 1     # recluster every epoch
  return config
