"""What the evaluator tests share: an evaluation Context on real Fashion-MNIST images.

A trained network is not needed: the random-init tiny backbone (small_cnn28, width 8,
feature_dim 64) already gives linear probes far above chance, which is enough to tell
a working evaluator from a broken one.
"""
import functools

import numpy as np
from PIL import Image

from conftest import test_config
from deeper_jax.data import ArraySource, Datasets, load_fashion_mnist
from deeper_jax.evaluate.context import Context
from deeper_jax.models import build_backbone
from deeper_jax.train.state import init_variables


def fashion_datasets(n_train: int = 1000, n_labelled: int = 2000, n_test: int = 1000,
                     labelled: bool = True) -> Datasets:
  """Disjoint slices of the real Fashion-MNIST splits, as in-memory sources.

  ``labelled=False``: an unlabelled training set and no labelled splits, as an
  uncurated image folder without ``config.data.eval_dir``.
  """
  train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
  part = lambda source, idx, with_labels=True: ArraySource(
      source.images(idx), source.labels[idx] if with_labels else None,
      10 if with_labels else None)
  if not labelled:
    return Datasets(part(train, np.arange(n_train), with_labels=False), None, None)
  return Datasets(part(train, np.arange(n_train)),
                  part(train, np.arange(n_train, n_train + n_labelled)),
                  part(test, np.arange(n_test)))


@functools.lru_cache(maxsize=8)
def _init_variables(model, seed: int, image_size: int, channels: int) -> dict:
  """``init_variables`` memoised: each call compiles the network's init afresh (~10 s on
  a loaded 2-core CPU), and the tests need only a few distinct networks."""
  config = test_config("tiny", **{"data.image_size": image_size})
  config.seed = seed
  return init_variables(model, config, channels)


def make_context(workdir, datasets: Datasets | None = None, *, variables_seed: int | None = None,
                 **overrides) -> Context:
  """A Context of the tiny config (``overrides`` as ``test_config``) and its random init.

  ``variables_seed``: initialise the evaluated network with this seed instead of the
  config's (so that it differs from the "random init" baseline of ``config.seed``).
  """
  config = test_config("tiny", **overrides)
  datasets = datasets if datasets is not None else fashion_datasets()
  model = build_backbone(config.model)
  channels = int(datasets.train.image_shape[-1])
  seed = config.seed if variables_seed is None else variables_seed
  variables = _init_variables(model, seed, config.data.image_size, channels)
  return Context(model=model, variables=variables, config=config, datasets=datasets,
                 mesh=None, workdir=str(workdir))


def pixels(source, n):
  """The first ``n`` images of ``source`` as float rows in [0, 1] (a raw-pixel baseline)."""
  return source.images(np.arange(n)).reshape(n, -1).astype(np.float32) / 255.0


def png_shows_data(path) -> bool:
  """A written PNG is a real picture: large enough, not flat, many colours."""
  image = np.asarray(Image.open(path).convert("RGB"), np.float32)
  return (min(image.shape[:2]) > 100 and image.std() > 20
          and len(np.unique(image.reshape(-1, 3), axis=0)) > 20)
