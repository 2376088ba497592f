"""RotNet on the paper's setting: VGG-16-BN on an uncurated folder, rotations only.

The network the paper starts DeeperCluster from (and the RotNet row of its Tables 3–4):

  python -m deeper_jax.main --distributed \\
      --config configs/rotnet_vgg16_yfcc.py --workdir /shared/runs/rotnet_yfcc \\
      --config.data.data_dir=/data/yfcc100m

then, to start DeeperCluster from it instead of its built-in warm-up:

  python -m deeper_jax.main --distributed --config configs/paper_vgg16_yfcc.py \\
      --workdir /shared/runs/deepercluster_yfcc --config.data.data_dir=/data/yfcc100m \\
      --config.method.rotnet_warmup_epochs=0 --config.train.init_from=/shared/runs/rotnet_yfcc
"""
from configs import paper_vgg16_yfcc


def get_config():
  config = paper_vgg16_yfcc.get_config()
  config.method.num_rotations = 4
  config.method.num_super_clusters = 1
  config.method.num_sub_clusters = 1
  config.method.rotnet_warmup_epochs = 0
  config.train.num_cycles = 1
  config.train.epochs_per_cycle = 30
  config.eval.evaluators = "probe_paper"
  return config
