"""DeeperCluster at the paper's scale: VGG-16-BN on YFCC100M-like uncurated folders.

Paper §4.3 / reference code: m = 4 super-clusters × 80k sub-clusters (320k clusters),
4 rotations (S = 16 super-classes), 224 px, global batch 3072 (64 GPUs × 48), SGD
momentum 0.9, constant lr 0.1, weight decay 1e-5, dropout 0.5, recluster every 3
epochs, Sobel front end, PCA-whitening of the 4096-d pre-ReLU fc7 features, backbone
initialised from a RotNet run (`train.init_from`).

Launch, on every host of a multi-GPU job (same command everywhere; the coordinator is
found from the environment: SLURM, Open MPI, Cloud TPU, or JAX_COORDINATOR_ADDRESS +
JAX_NUM_PROCESSES + JAX_PROCESS_ID):

  python -m deeper_jax.main --distributed \\
      --config configs/paper_vgg16_yfcc.py --workdir /shared/runs/deepercluster_yfcc \\
      --config.data.data_dir=/data/yfcc100m --config.train.init_from=/shared/runs/rotnet_yfcc

With 64 devices the mesh is 16 (super) × 4 (data): each group of 4 devices holds the
sub-heads of one super-class (4096 × 80k floats = 1.3 GB) and sees only its images.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "image_folder"
  config.data.data_dir = ""             # set on the command line: the uncurated folder
  config.data.image_size = 224
  config.data.channels = 3
  config.data.labels_from_subdirs = False
  config.data.eval_dir = ""             # optional: <eval_dir>/{train,test}/<class>/ for probes
  config.data.download = False

  config.model.name = "vgg16_bn"
  config.model.sobel = True
  config.model.width = 64
  config.model.feature_dim = 4096
  config.model.dropout = 0.5
  config.model.mean = (0.485, 0.456, 0.406)
  config.model.std = (0.229, 0.224, 0.225)

  config.method.num_rotations = 4
  config.method.num_super_clusters = 4
  config.method.num_sub_clusters = 80_000
  config.method.loss = "hierarchical"

  config.clustering.pca_dim = 4096      # whitening without reduction, as the reference
  config.clustering.pca_sample_size = 1_000_000
  config.clustering.num_iters = 10
  config.clustering.chunk_size = 8192
  config.clustering.extract_batch_size = 1536

  config.train.batch_size = 3072        # 16 super-classes × 192
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-5
  config.train.epochs_per_cycle = 3
  config.train.num_cycles = 34          # ≈100 epochs
  config.train.crop_pad = 16
  config.train.log_every_steps = 100

  config.checkpoint.every_steps = 1000
  config.checkpoint.max_to_keep = 3

  config.eval.probe_max_train_images = 0
  config.eval.probe_max_test_images = 0
  return config
