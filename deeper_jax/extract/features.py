"""Frozen features of a backbone over a data source: step 1 of a cycle, and what
every evaluator reads.

The module runs in eval mode (BatchNorm running statistics, no dropout) on the
centre view of each image (deeper_jax/augment.py), in fixed-size batches so that the
jitted function compiles once (the last batch is padded and the padding dropped).

Layers by name (``layer_shapes`` lists them):

* ``'features'``: the ``[N, D]`` fc7 output before any ReLU — what the heads and
  k-means read;
* blocks ``'conv1'`` … : each stage's output *after* its max-pool (the fast probe);
* conv layers ``'conv1_1'`` … : each conv-BN-ReLU output *before* pooling, taken
  with flax's ``capture_intermediates`` (the paper's probes: VGG-16's conv1 … conv13
  are ``conv1_1`` … ``conv5_3``).

Block and conv-layer activations are average-pooled below ``max_dim`` values
(extract/pooling.py: ``'adaptive'`` for the fast probe, ``'paper'`` for the
reference's fixed windows) and flattened.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from deeper_jax import augment
from deeper_jax.extract import pooling
from deeper_jax.models import ConvBNReLU
from deeper_jax.runtime import logs
from deeper_jax.runtime import mesh as mesh_lib

FEATURES = "features"  # the [N, D] fc7-like output of the backbone
ALL_LAYERS = "all"
POOLINGS = ("adaptive", "paper")


def _is_conv_layer(module, method_name: str) -> bool:
  return isinstance(module, ConvBNReLU) and method_name == "__call__"


def apply_layers(module, variables, x: jax.Array, *, train: bool = False, rngs=None
                 ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """``(features, blocks, conv_layers)`` of float images ``x [B, S, S, C]`` in [0, 1].

  ``conv_layers`` maps ``'conv{i}_{j}'`` to that conv-BN-ReLU's output before pooling.
  Unused outputs cost nothing under ``jit``.
  """
  (features, blocks), state = module.apply(
      variables, x, train=train, rngs=rngs, capture_intermediates=_is_conv_layer,
      mutable=["intermediates"])
  convs = {name: value["__call__"][0] for name, value in state["intermediates"].items()
           if isinstance(value, dict) and "__call__" in value}
  return features, blocks, convs


def layer_shapes(module, variables, image_size: int, channels: int
                 ) -> tuple[int, dict[str, tuple], dict[str, tuple]]:
  """(D, {block: (h, w, c)}, {conv layer: (h, w, c)}) at this image size, not run."""
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  features, blocks, convs = jax.eval_shape(
      lambda v, x: apply_layers(module, v, x), variables, dummy)
  shape = lambda tree: {k: tuple(v.shape[1:]) for k, v in tree.items()}
  return math.prod(features.shape[1:]), shape(blocks), shape(convs)


def resolve_layers(layers: str | Sequence[str], available: Sequence[str]) -> list[str]:
  """``'all'`` → every available layer; a comma-separated string or list → checked."""
  if isinstance(layers, str):
    if layers == ALL_LAYERS:
      return list(available)
    layers = [name.strip() for name in layers.split(",") if name.strip()]
  unknown = [name for name in layers if name not in available]
  if unknown:
    raise ValueError(f"layers {unknown} are not layers of this backbone; choose among "
                     f"{list(available)} (or 'all').")
  return list(layers)


def pooled_size(shape_hwc: Sequence[int], pooling_rule: str, max_dim: int) -> tuple[int, int]:
  """(output dims, window or adaptive side) of one activation under a pooling rule."""
  if pooling_rule == "paper":
    window = pooling.paper_window(shape_hwc, max_dim)
    h, w, c = shape_hwc
    return (h // window) * (w // window) * c, window
  ph, pw, c = pooling.pool_to_dim(shape_hwc, max_dim)
  return ph * pw * c, ph


def pool(x: jax.Array, pooling_rule: str, max_dim: int) -> jax.Array:
  """``[B, h, w, c]`` → ``[B, d]`` under ``pooling_rule``."""
  if pooling_rule == "paper":
    return pooling.window_pool(x, pooling.paper_window(x.shape[1:], max_dim))
  return pooling.pool_features(x, max_dim)


def map_batches(fn: Callable[[np.ndarray], dict[str, jax.Array]], source,
                indices: np.ndarray, *, batch_size: int, out_dims: dict[str, int],
                dtype=np.float32, mesh: Mesh | None = None,
                name: str = "extract", on_batch=None) -> dict[str, np.ndarray]:
  """Runs ``fn`` over ``source.images(indices)`` in fixed-size batches.

  ``fn`` maps a uint8 batch [batch_size, H, W, C] to a dict of [batch_size, d]
  arrays. The next batch is read from the source while the device computes
  the current one (jax dispatch is asynchronous), and the results are written
  into preallocated numpy arrays, so memory holds one copy of the outputs.
  ``on_batch(batches_done)`` is called after each batch.
  """
  n = len(indices)
  outputs = {k: np.empty((n, d), dtype) for k, d in out_dims.items()}
  sharding = mesh_lib.rows_sharding(mesh) if mesh is not None else None
  num_batches = -(-n // batch_size)
  report = logs.progress(f"{name}: {n} images", num_batches)
  pending, done = None, 0

  def collect(item):
    nonlocal done
    result, start, count = item
    for k, v in result.items():
      outputs[k][start:start + count] = np.asarray(v[:count], dtype)
    done += 1
    report(done)
    if on_batch is not None:
      on_batch(done)

  for start in range(0, n, batch_size):
    batch_idx = indices[start:start + batch_size]
    images = np.asarray(source.images(batch_idx))
    images, count = mesh_lib.pad_rows(images, batch_size)
    images = jax.device_put(images, sharding) if sharding is not None else images
    result = fn(images)
    if pending is not None:
      collect(pending)
    pending = (result, start, count)
  if pending is not None:
    collect(pending)
  return outputs


@functools.lru_cache(maxsize=16)
def _extract_fn(module, image_size: int, layers: tuple[str, ...], pooling_rule: str,
                max_dim: int):
  """Jitted ``(variables, uint8 images) -> {name: [B, d]}``, cached per module.

  Every cycle of a training run extracts with the same module and layers, so
  the compiled program is reused instead of rebuilt each time.
  """
  @jax.jit
  def apply(variables, images_u8):
    x = augment.center_crop(images_u8, image_size).astype(jnp.float32) / 255.0
    features, blocks, convs = apply_layers(module, variables, x)
    out = {FEATURES: features.reshape(features.shape[0], -1)}
    for name in layers:
      out[name] = pool(blocks[name] if name in blocks else convs[name], pooling_rule, max_dim)
    return out
  return apply


def extract_features(module, variables, source, *, image_size: int | None = None,
                     batch_size: int = 512, layers: str | Sequence[str] = (),
                     indices: np.ndarray | None = None, pooling_rule: str = "adaptive",
                     max_dim: int = 10_000, dtype=np.float32, mesh: Mesh | None = None,
                     on_batch=None, name: str = "extract features") -> dict[str, np.ndarray]:
  """Eval-mode features of ``source`` (or of ``source[indices]``), as numpy.

  Returns ``{'features': [N, D]}`` plus each requested block or conv layer
  (``layers``: names, or ``'all'`` for every block), pooled and flattened.
  ``image_size``: side of the centre view (default: the source's own). Rows follow
  ``indices``. Memory: N x (D + sum of pooled dims) x itemsize of ``dtype``. With a
  ``mesh`` each batch is split over its devices and ``batch_size`` rounded up to a
  multiple of the device count.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if pooling_rule not in POOLINGS:
    raise ValueError(f"pooling_rule must be one of {POOLINGS}, got {pooling_rule!r}.")
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  height, _, channels = source.image_shape
  image_size = image_size or height
  batch_size = min(batch_size, max(len(indices), 1))
  if mesh is not None:
    batch_size = -(-batch_size // mesh.size) * mesh.size
    variables = jax.device_put(variables, mesh_lib.replicated(mesh))

  feature_dim, blocks, convs = layer_shapes(module, variables, image_size, channels)
  shapes = {**blocks, **convs}
  names = [k for k in resolve_layers(layers, [*blocks, *convs, FEATURES]) if k != FEATURES]
  if layers == ALL_LAYERS:
    names = list(blocks)
  out_dims = {FEATURES: int(feature_dim)}
  for k in names:
    out_dims[k], how = pooled_size(shapes[k], pooling_rule, max_dim)
    logging.info("%s: %s %s -> %s pooling (%s) -> %d dims", name, k, shapes[k], pooling_rule,
                 how, out_dims[k])
  apply = _extract_fn(module, image_size, tuple(names), pooling_rule, max_dim)
  return map_batches(lambda images: apply(variables, images), source, indices,
                     batch_size=batch_size, out_dims=out_dims, dtype=dtype,
                     mesh=mesh, name=name, on_batch=on_batch)
