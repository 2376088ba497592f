"""DeeperCluster on uncurated Fashion-MNIST, sized for a 2-core CPU (about 5 minutes).

Launch (trains, then evaluates; run it again to resume):
  python -m deeper_jax.main --config configs/default.py --workdir runs/demo

The uncurated training set stands in for YFCC100M: the long-tailed train split (class
sizes falling geometrically 10:1) plus near-duplicates (10 %) and unlabelled out-of-domain
clutter (20 %: crops of photos, upscaled digits, blanks, noise), ≈35k images. No labels
are used for training; the balanced labelled split is only read by the evaluators. The
hyper-parameters are those the study chose on a validation split (benchmarks/reproduce.py,
docs/RESULTS.md). This file declares every field the code reads; any of them can be
overridden on the command line (``--config.train.num_cycles=5``), and the other configs
derive from this one.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                     # training randomness: init, clustering, sampling, crops

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist_uncurated"  # see deeper_jax/data/registry.py
  config.data.data_dir = ""           # '' = Debian's /usr/share/datasets/fashion-mnist
  config.data.image_size = 28         # side of what the network sees (crops, extraction)
  config.data.load_size = 0           # side images are decoded to (0 = image_size); random
                                      # crops are drawn from it (reference: 256 for 224)
  config.data.channels = 0            # image folders / tfds: 1 or 3 (0 = the source's own; 3)
  config.data.imbalance_ratio = 10.0  # largest / smallest class of the long-tailed sets
  config.data.duplicate_fraction = 0.1  # fashion_mnist_uncurated: share of near-duplicates
  config.data.clutter_fraction = 0.2  # fashion_mnist_uncurated: share of unlabelled clutter
  config.data.validation_size = 0     # Fashion-MNIST: train images held out as the eval split
  config.data.max_train_images = 0    # 0 = all (uncurated: ≈35k images)
  config.data.max_eval_images = 0     # cap on the labelled train / test splits (0 = all)
  config.data.seed = 0                # which images the subsets keep (apart from `seed`)
  config.data.download = False        # let tfds download Fashion-MNIST when nothing is local
  config.data.eval_dir = ""           # image folders: <eval_dir>/{train,test}/<class>/ for probes
  config.data.labels_from_subdirs = False  # image folders: class = first sub-folder
  config.data.tfds_name = ""          # data.name='tfds': a prepared (array_record) dataset
  config.data.train_split = "train"   # tfds splits
  config.data.test_split = "test"
  # Input pipeline (deeper_jax/data/pipeline.py): images decoded ahead of the train step
  # and of every feature extraction (clustering, evaluators).
  config.data.workers = 2             # decode workers; 0 = in the training thread, no prefetch
  config.data.worker_kind = "auto"    # 'threads', 'processes', or 'auto': processes for
                                      # reads of >= 20k images from files (folders,
                                      # ArrayRecord), threads otherwise
  config.data.prefetch = 2            # batches decoded ahead of the step (workers > 0)

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn28"   # see deeper_jax/models/architectures.py
  config.model.sobel = True           # fixed grayscale + Sobel front end (paper §4.3)
  config.model.folded_sobel = False   # set by export: Sobel folded into conv1_1
  config.model.width = 16             # channels of the first block; doubles per block
  config.model.feature_dim = 256      # D: the fc7-like layer the heads and k-means read
  config.model.dropout = 0.5
  config.model.fc_init = "torch"      # fc6/fc7: 'torch' (DeeperCluster) or 'normal' N(0, .01)
  config.model.dtype = "float32"      # compute dtype: 'float32' or 'bfloat16'
  config.model.mean = (0.286,)        # Fashion-MNIST pixel statistics, applied in the model
  config.model.std = (0.353,)

  # RotNet, DeepCluster and DeeperCluster are settings of these fields.
  config.method = ml_collections.ConfigDict()
  config.method.num_rotations = 4      # R: 4 (0/90/180/270°) or 1 (no rotation task)
  config.method.num_super_clusters = 4  # m: level-1 k-means; S = R·m super-classes
  config.method.num_sub_clusters = 10   # k_sub: level-2 k-means inside each super-cluster
  config.method.loss = "hierarchical"   # paper eq. 5; 'flat' = eq. 4 (one head, S·k_sub classes)
  config.method.targets = "clusters"    # 'labels': the training set's classes (supervised bound)
  config.method.head_init = "torch"     # 'torch' U(±1/√D) (DeeperCluster), 'normal' N(0, .01)
  config.method.sub_head_grad = "per_group"  # W_s's gradient: mean over its own images
                                        # (reference code) or 'global_mean' (eq. 5 literally)
  config.method.rotnet_warmup_epochs = 3  # RotNet epochs before the first clustering (paper)

  config.clustering = ml_collections.ConfigDict()
  config.clustering.pca_dim = 64        # PCA-whitening output size before L2 + k-means
  config.clustering.pca_sample_size = 20_000  # rows the PCA is fitted on
  config.clustering.num_iters = 10      # Lloyd iterations (the paper: 10 suffice)
  config.clustering.init = "random"     # 'random' data points (paper) or 'kmeans++'
  config.clustering.chunk_size = 8192   # rows per distance block: memory chunk·k, never N·k
  config.clustering.extract_batch_size = 1024
  config.clustering.memory_budget_gb = 0.0  # features per process over this (N·D·4/P bytes):
                                        # spilled to <workdir>/features/, streamed; 0: no limit

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256         # global batch: S super-classes × 16 images
  config.train.num_cycles = 7           # clusterings; one per `epochs_per_cycle` epochs
  config.train.epochs_per_cycle = 3     # T (paper: 3); an epoch = N samples (each image once)
  config.train.learning_rate = 0.05     # constant, as in the paper (0.1 at batch 3072)
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-5
  config.train.crop = "random_resized"  # reference: RandomResizedCrop + flip; or 'pad'
  config.train.crop_scale = (0.08, 1.0)  # area fraction of a random-resized crop
  config.train.crop_ratio = (3 / 4, 4 / 3)  # its aspect ratio range
  config.train.crop_pad = 2             # crop='pad': random crop of a zero-padded image
  config.train.log_every_steps = 50
  config.train.init_from = ""           # a workdir or export to start the backbone from
  config.train.profile = False          # a clu profile of a few steps into <workdir>

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 200
  config.checkpoint.max_to_keep = 2

  # Evaluators (deeper_jax/evaluate/): run after training and by --mode eval.
  config.eval = ml_collections.ConfigDict()
  config.eval.evaluators = "probe,clusters"  # comma-separated names, in order
  config.eval.batch_size = 512          # images per forward pass
  config.eval.max_pool_dim = 10_000     # pool activations below this many dims (paper)
  # 'probe': fast linear probe on standardised, pooled features.
  config.eval.probe_layers = "all"      # 'all' blocks + 'features', or comma-separated names
  config.eval.probe_random_init = True  # also probe the untrained network of the same seed
  config.eval.probe_max_train_images = 20_000  # labelled (balanced) images it is fitted on
  config.eval.probe_max_test_images = 0     # 0 = the whole test split
  config.eval.probe_epochs = 10
  config.eval.probe_batch_size = 256
  config.eval.probe_lr = 10.0           # peak of a cosine schedule (standardised features)
  config.eval.probe_momentum = 0.9
  config.eval.probe_weight_decay = 1e-6
  # 'probe_paper': the paper's protocol (eval_linear.py): every conv layer before pooling.
  config.eval.paper_layers = "all"      # 'all' conv layers or comma-separated (conv1_1, ...)
  config.eval.paper_epochs = 10         # reference: 100
  config.eval.paper_batch_size = 256
  config.eval.paper_lr = 0.02           # reference: 0.005 (conv1) … 0.03; 0.02 for conv13
  config.eval.paper_weight_decay = 1e-5
  config.eval.paper_max_train_images = 20_000
  config.eval.paper_max_test_images = 0
  # 'knn': cosine kNN vote on frozen features.
  config.eval.knn_layer = "features"
  config.eval.knn_k = 20
  config.eval.knn_temperature = 0.07    # vote weight exp(sim / T)
  config.eval.knn_weighting = "exp"     # 'exp' (Wu et al.) or 'majority'
  # 'finetune': the whole network with 1% / 10% of the labels, vs from scratch.
  config.eval.finetune_fractions = (0.01, 0.1)
  config.eval.finetune_steps = 300
  config.eval.finetune_batch_size = 64
  config.eval.finetune_lr = 0.1
  config.eval.finetune_momentum = 0.9
  config.eval.finetune_weight_decay = 5e-4
  config.eval.finetune_max_test_images = 0
  # 'clusters': the final network's clusters (RotNet's features: flat k-means of clusters_k).
  config.eval.clusters_k = 40
  config.eval.clusters_pixel_baseline = False  # also NMI of k-means on raw pixels, same k
  # 'cluster_grid': pictures of the final clusters.
  config.eval.grid_num_random = 4
  config.eval.grid_per_cluster = 16
  return config
