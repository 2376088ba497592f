"""DeepCluster (Caron et al. 2018): flat k-means pseudo-labels, no rotation.

  python -m deeper_jax.main --config configs/deepcluster.py --workdir runs/deepcluster

One super-cluster, one rotation, k clusters, PCA-whitening (256 dims in the reference,
here the whole 256-d feature), recluster every epoch, DeepCluster's N(0, 0.01) init of
the linear layers and of the classifier head. With R = m = 1 the super-loss is
identically zero and the single sub-head is DeepCluster's classifier. Same sample budget
as the default (24 epochs of N images); no RotNet start.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.fc_init = "normal"
  config.method.num_rotations = 1
  config.method.num_super_clusters = 1
  config.method.num_sub_clusters = 100  # k (reference: 10000 on ImageNet)
  config.method.head_init = "normal"
  config.method.rotnet_warmup_epochs = 0
  config.clustering.pca_dim = 256       # the reference's PCA size (= feature_dim here)
  config.train.batch_size = 256
  config.train.num_cycles = 24
  config.train.epochs_per_cycle = 1     # recluster every epoch
  return config
