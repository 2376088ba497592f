"""Image sources, the Fashion-MNIST / digits / image-folder / tfds loaders, and the sampler.

Everything here is numpy on the host; TensorFlow is never imported, and
``tensorflow_datasets`` only when a tfds source is built.
"""
from deeper_jax.data.digits import load_digits
from deeper_jax.errors import DatasetNotFoundError
from deeper_jax.data.fashion_mnist import load_fashion_mnist, read_idx
from deeper_jax.data.image_folder import ImageFolderSource
from deeper_jax.data.long_tail import long_tail_indices, long_tail_sizes
from deeper_jax.data.registry import DATASETS, Datasets, build_datasets
from deeper_jax.data.sampler import epoch_plan, steps_per_epoch
from deeper_jax.data.sources import (ArraySource, ResizedSource, Source, SubsetSource,
                                     random_subset, read_all, resized)

__all__ = [
    "ArraySource", "DATASETS", "DatasetNotFoundError", "Datasets",
    "ImageFolderSource",
    "ResizedSource", "Source", "SubsetSource", "build_datasets", "epoch_plan", "load_digits",
    "load_fashion_mnist", "long_tail_indices", "long_tail_sizes", "random_subset", "read_all",
    "read_idx", "resized", "steps_per_epoch",
]
