"""DeeperCluster at the paper's scale: VGG-16-BN on a YFCC100M-like uncurated folder.

The reference code's settings (main.sh, src/): m = 4 super-clusters × 80k sub-clusters
(320k clusters), 4 rotations (S = 16 super-classes), 224-px random-resized crops of
images decoded at 256, global batch 3072 (64 GPUs × 48), SGD momentum 0.9, constant lr
0.1, weight decay 1e-5, dropout 0.5, recluster every 3 epochs (an epoch = N images),
100 epochs, Sobel front end, PCA-whitening of the 4096-d pre-ReLU fc7 features (no
reduction), PyTorch's default init of the linear layers and heads, each sub-head's
gradient a mean over its own group's images. The paper starts from a RotNet trained on
the same data: here a RotNet warm-up of ``method.rotnet_warmup_epochs`` epochs inside
the same run (the paper does not give its length), or set it to 0 and point
``train.init_from`` at a run of configs/rotnet_vgg16_yfcc.py.

Launch, on every host of a multi-GPU job (same command everywhere; the coordinator is
found from SLURM, Open MPI or Cloud TPU, else pass --coordinator_address,
--num_processes and --process_id):

  python -m deeper_jax.main --distributed \\
      --config configs/paper_vgg16_yfcc.py --workdir /shared/runs/deepercluster_yfcc \\
      --config.data.data_dir=/data/yfcc100m

With 64 devices the mesh is 16 (super) × 4 (data): each group of 4 devices holds the
sub-heads of one super-class (4096 × 80k floats = 1.3 GB) and sees only its images.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "image_folder"
  config.data.data_dir = ""             # set on the command line: the uncurated folder
  config.data.image_size = 224
  config.data.load_size = 256           # Resize(256); crops and centre views of 224
  config.data.channels = 3
  config.data.labels_from_subdirs = False
  config.data.eval_dir = ""             # optional: <eval_dir>/{train,test}/<class>/ for probes

  config.model.name = "vgg16_bn"
  config.model.sobel = True
  config.model.width = 64
  config.model.feature_dim = 4096
  config.model.dropout = 0.5
  config.model.fc_init = "torch"
  config.model.mean = (0.485, 0.456, 0.406)
  config.model.std = (0.229, 0.224, 0.225)

  config.method.num_rotations = 4
  config.method.num_super_clusters = 4
  config.method.num_sub_clusters = 80_000
  config.method.loss = "hierarchical"
  config.method.head_init = "torch"
  config.method.sub_head_grad = "per_group"
  config.method.rotnet_warmup_epochs = 10  # not given by the paper

  config.clustering.pca_dim = 4096      # whitening without reduction, as the reference
  config.clustering.pca_sample_size = 4096 * 4095 // 2  # the reference: D(D-1)/2 images
  config.clustering.num_iters = 10
  config.clustering.chunk_size = 8192
  config.clustering.extract_batch_size = 1536

  config.train.batch_size = 3072        # 16 super-classes × 192
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-5
  config.train.crop = "random_resized"
  config.train.epochs_per_cycle = 3
  config.train.num_cycles = 34          # 102 epochs (reference: 100, reclustering every 3)
  config.train.log_every_steps = 100

  config.checkpoint.every_steps = 1000
  config.checkpoint.max_to_keep = 3

  config.eval.evaluators = "probe_paper,clusters"
  config.eval.paper_layers = "conv5_3"  # Table 3 probes conv13; 'all' for Fig. 2
  config.eval.paper_epochs = 100
  config.eval.paper_lr = 0.02
  config.eval.paper_max_train_images = 0
  config.eval.probe_max_train_images = 0
  return config
