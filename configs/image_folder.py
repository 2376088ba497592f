"""DeeperCluster on your own folder of unlabelled photos, on a CPU or a GPU.

  python -m deeper_jax.main --config configs/image_folder.py --workdir runs/photos \\
      --config.data.data_dir=/path/to/photos

Any tree of images (JPEG, PNG, GIF, WebP, TIFF, BMP, …), any sizes; unreadable files are
skipped and counted (results.json: run.skipped_files). Without labels the run reports
what needs none: cluster sizes, NMI between consecutive clusterings, losses, pictures of
the clusters (eval/clusters.png). For linear probes and kNN, add a labelled folder:
``--config.data.eval_dir=/path/with/train_and_test`` holding ``train/<class>/…`` and
``test/<class>/…``, and ``--config.eval.evaluators=probe,knn,clusters,cluster_grid``.

Sized for a few thousand photos on a CPU: a small CNN at 64 px (decoded at 72, random
crops of 64), 4 × 8 clusters. For a GPU and a large collection, start from
configs/paper_vgg16_yfcc.py.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "image_folder"
  config.data.data_dir = ""             # set on the command line
  config.data.image_size = 64
  config.data.load_size = 72
  config.data.channels = 3
  config.model.name = "small_cnn32"     # 3 conv stages; 64 px → 32 → 16 → 8
  config.model.width = 32
  config.model.feature_dim = 256
  config.model.mean = (0.485, 0.456, 0.406)
  config.model.std = (0.229, 0.224, 0.225)
  config.method.num_super_clusters = 4
  config.method.num_sub_clusters = 8
  config.method.rotnet_warmup_epochs = 5
  config.clustering.pca_dim = 64
  config.train.batch_size = 128         # 16 super-classes × 8
  config.train.num_cycles = 10
  config.train.epochs_per_cycle = 3
  config.train.log_every_steps = 10
  config.checkpoint.every_steps = 100
  config.eval.evaluators = "clusters,cluster_grid"
  return config
