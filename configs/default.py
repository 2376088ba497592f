"""DeeperCluster on long-tailed ("uncurated") Fashion-MNIST, sized for a 2-core CPU.

Launch (trains, then evaluates; run it again to resume):
  python -m deeper_jax.main --config configs/default.py --workdir runs/demo

The long-tailed training set (class sizes falling geometrically 10:1) stands in for
YFCC100M: no labels are used for training; the balanced labelled split is only read by
the final linear probe. Fields are overridable: ``--config.train.num_cycles=5``.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist_longtail"  # see deeper_jax/data/registry.py
  config.data.data_dir = ""           # '' = Debian's /usr/share/datasets/fashion-mnist, else tfds
  config.data.imbalance_ratio = 10.0  # largest / smallest class of the pre-training set
  config.data.image_size = 28
  config.data.max_train_images = 0    # 0 = all (≈24k images for ratio 10)
  config.data.download = True         # tfds download, only if no local copy is found

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn28"   # see deeper_jax/models/__init__.py
  config.model.sobel = True           # fixed grayscale + Sobel front end (paper §4.3)
  config.model.width = 16             # channels of the first block; doubles per block
  config.model.feature_dim = 256      # D: the fc7-like layer the heads and k-means read
  config.model.dropout = 0.5
  config.model.mean = (0.286,)        # Fashion-MNIST pixel statistics, applied in the model
  config.model.std = (0.353,)

  # RotNet, DeepCluster and DeeperCluster are settings of these four fields.
  config.method = ml_collections.ConfigDict()
  config.method.num_rotations = 4      # R: 4 (0/90/180/270°) or 1 (no rotation task)
  config.method.num_super_clusters = 4  # m: level-1 k-means; S = R·m super-classes
  config.method.num_sub_clusters = 10   # k_sub: level-2 k-means inside each super-cluster
  config.method.loss = "hierarchical"   # paper eq. 5; 'flat' = eq. 4 (one head, S·k_sub classes)

  config.clustering = ml_collections.ConfigDict()
  config.clustering.pca_dim = 64        # PCA-whitening output size before L2 + k-means
  config.clustering.pca_sample_size = 20_000  # rows the PCA is fitted on
  config.clustering.num_iters = 10      # Lloyd iterations (the paper: 10 suffice)
  config.clustering.init = "random"     # 'random' data points (paper) or 'kmeans++'
  config.clustering.chunk_size = 8192   # rows per distance block: memory chunk·k, never N·k
  config.clustering.dot = "auto"        # scores x·c: 'float32', 'bf16x3' (AMX), 'auto'
  config.clustering.extract_batch_size = 1024

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256         # global batch: S super-classes × 16 images
  config.train.num_cycles = 3           # clusterings; one per `epochs_per_cycle` epochs
  config.train.epochs_per_cycle = 2     # T (paper: 3); an epoch = every image once per rotation
  config.train.learning_rate = 0.05     # constant, as in the paper (0.1 at batch 3072)
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-5
  config.train.crop_pad = 2             # random crop from a 2-px zero padding, plus flips
  config.train.log_every_steps = 50
  config.train.init_from = ""           # a workdir or export to start the backbone from (e.g. RotNet)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 200
  config.checkpoint.max_to_keep = 2

  config.eval = ml_collections.ConfigDict()
  config.eval.probe_layer = ""          # results.json's probe: '' = the last conv block
  config.eval.probe_max_train_images = 20_000  # labelled (balanced) images the probe is fitted on
  config.eval.probe_max_test_images = 0     # 0 = the whole test split
  config.eval.probe_epochs = 10
  # Other fields (probe_lr, knn_*, finetune_*, grid_*): deeper_jax/evaluate/suite.py DEFAULTS.
  config.eval.knn_k = 20
  config.eval.finetune_fractions = (0.01, 0.1)
  config.eval.finetune_steps = 300
  return config
