"""Frozen features of a backbone over a data source, pooled for linear probes.

The paper (§5, after Zhang et al.) probes every conv block with a linear
classifier and, "to reduce the influence of feature dimension", average-pools
each activation "until its dimension is below 10k". Our rule, precisely:

  *Adaptive* average pooling (PyTorch ``AdaptiveAvgPool2d`` bins: output cell
  ``i`` of an axis of length ``h`` averages rows ``floor(i*h/s) ..
  ceil((i+1)*h/s) - 1``) to the **largest** output side ``s`` such that
  ``min(h, s) * min(w, s) * c < max_dim``. A block already below ``max_dim``
  is left as is; a block with ``c >= max_dim`` is globally pooled to 1x1xc
  (the only case where the result is not below ``max_dim``).

Adaptive bins rather than a fixed window with stride = window, because a
fixed window leaves ragged borders (7 -> window 2 -> 3.5) and pads or drops
them; with adaptive bins every input cell counts and the output side is the
quantity the rule is about. For VGG-16 at 224 px the two rules agree on the
resulting sizes, and the last block gives the paper's 8192 dimensions
(Table 3: "average-pool the features of the last layer resulting in
representations of 8192 dimensions"):

  ======  ===========  ======  ==========  =====
  block   activation   dim     pooled      dim
  ======  ===========  ======  ==========  =====
  conv1   112x112x64   802816  12x12x64    9216
  conv2   56x56x128    401408  8x8x128     8192
  conv3   28x28x256    200704  6x6x256     9216
  conv4   14x14x512    100352  4x4x512     8192
  conv5   7x7x512      25088   4x4x512     8192
  ======  ===========  ======  ==========  =====

Pooling is a pair of small matrix products (exact, jit-friendly, no ragged
windows). Extraction runs the module in eval mode (``train=False``) on
``uint8`` images scaled to ``[0, 1]``, in fixed-size batches so that the jitted
function compiles once (the last batch is padded and the padding dropped).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from deeper_jax import parallel
from deeper_jax.progress import Progress

FEATURES = "features"  # the [N, D] fc7-like output of the backbone
ALL_LAYERS = "all"


def pool_to_dim(shape_hwc: Sequence[int],
                max_dim: int = 10_000) -> tuple[int, int, int]:
  """The (h, w, c) an activation of ``shape_hwc`` is average-pooled to.

  See the module docstring for the rule; this pure function is the single
  place that decides it, so tests and reports can call it without a model.
  """
  if len(shape_hwc) != 3 or min(shape_hwc) < 1:
    raise ValueError(f"shape_hwc must be three positive sizes (h, w, c); "
                     f"got {tuple(shape_hwc)}.")
  if max_dim < 2:
    raise ValueError(f"max_dim must be at least 2; got {max_dim}.")
  h, w, c = (int(v) for v in shape_hwc)
  side = max(h, w)
  while side > 1 and min(h, side) * min(w, side) * c >= max_dim:
    side -= 1
  return min(h, side), min(w, side), c


def _bin_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] averaging matrix of adaptive pooling along one axis."""
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    lo = (i * size) // out
    hi = -((-(i + 1) * size) // out)  # ceil((i + 1) * size / out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Adaptive average pooling of NHWC ``x`` to spatial size ``out_hw``."""
  _, h, w, _ = x.shape
  if (h, w) == tuple(out_hw):
    return x
  mh = jnp.asarray(_bin_matrix(h, out_hw[0]))
  mw = jnp.asarray(_bin_matrix(w, out_hw[1]))
  return jnp.einsum("nhwc,ih,jw->nijc", x, mh, mw)


def pool_features(x: jax.Array, max_dim: int = 10_000) -> jax.Array:
  """Pools an NHWC activation by :func:`pool_to_dim` and flattens it to [N, d]."""
  ph, pw, _ = pool_to_dim(x.shape[1:], max_dim)
  return adaptive_avg_pool(x, (ph, pw)).reshape(x.shape[0], -1)


def image_shape(source) -> tuple[int, int, int]:
  shape = getattr(source, "image_shape", None)
  if shape is None:
    shape = source.images(np.zeros((1,), np.int64)).shape[1:]
  return tuple(int(v) for v in shape)


def output_shapes(module, variables, shape_hwc: Sequence[int]
                  ) -> tuple[int, dict[str, tuple]]:
  """(feature dim D, {block name: (h, w, c)}) of the backbone, without running it."""
  dummy = jax.ShapeDtypeStruct((1, *shape_hwc), jnp.float32)
  features, blocks = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=False), variables, dummy)
  return (math.prod(features.shape[1:]),
          {name: tuple(b.shape[1:]) for name, b in blocks.items()})


def block_shapes(module, variables, shape_hwc: Sequence[int]) -> dict[str, tuple]:
  """name -> (h, w, c) of every block the module returns, without running it."""
  return output_shapes(module, variables, shape_hwc)[1]


def resolve_layers(layers, available: Sequence[str]) -> list[str]:
  """Block names to extract: None -> none, 'all' -> every block, else the list."""
  if layers is None:
    return []
  if isinstance(layers, str):
    if layers != ALL_LAYERS:
      layers = [layers]
    else:
      return list(available)
  names = [name for name in layers if name != FEATURES]
  unknown = [name for name in names if name not in available]
  if unknown:
    raise ValueError(f"layers {unknown} are not blocks of this backbone; "
                     f"choose among {list(available)} (or 'all').")
  return names


def map_batches(fn: Callable[[np.ndarray], dict[str, jax.Array]], source,
                indices: np.ndarray, *, batch_size: int, out_dims: dict[str, int],
                dtype=np.float32, mesh: Mesh | None = None,
                name: str = "extract", progress=None) -> dict[str, np.ndarray]:
  """Runs ``fn`` over ``source.images(indices)`` in fixed-size batches.

  ``fn`` maps a uint8 batch [batch_size, H, W, C] to a dict of [batch_size, d]
  arrays. The next batch is read from the source while the device computes
  the current one (jax dispatch is asynchronous), and the results are written
  into preallocated numpy arrays, so memory holds one copy of the outputs.
  """
  n = len(indices)
  outputs = {k: np.empty((n, d), dtype) for k, d in out_dims.items()}
  sharding = parallel.rows_sharding(mesh) if mesh is not None else None
  meter = Progress(f"{name} (images)", n)
  pending = None

  def collect(item):
    result, start, count = item
    for k, v in result.items():
      outputs[k][start:start + count] = np.asarray(v[:count], dtype)
    meter.update(meter.done + count)
    if progress is not None:
      progress(meter.done, n)

  for start in range(0, n, batch_size):
    batch_idx = indices[start:start + batch_size]
    images = np.asarray(source.images(batch_idx))
    images, count = parallel.pad_rows(images, batch_size)
    images = jax.device_put(images, sharding) if sharding is not None else images
    result = fn(images)
    if pending is not None:
      collect(pending)
    pending = (result, start, count)
  if pending is not None:
    collect(pending)
  return outputs


@functools.lru_cache(maxsize=16)
def _extract_fn(module, pooled_hw: tuple[tuple[str, tuple[int, int]], ...]):
  """Jitted ``(variables, uint8 images) -> {name: [B, d]}``, cached per module.

  Every cycle of a training run extracts with the same module and layers, so
  the compiled program is reused instead of rebuilt each time.
  """
  @jax.jit
  def apply(variables, images_u8):
    x = images_u8.astype(jnp.float32) / 255.0
    features, blocks = module.apply(variables, x, train=False)
    out = {FEATURES: features.reshape(features.shape[0], -1)}
    for name, hw in pooled_hw:
      out[name] = adaptive_avg_pool(blocks[name], hw).reshape(x.shape[0], -1)
    return out
  return apply


def extract_features(module, variables, source, *, batch_size: int = 512,
                     layers: str | Sequence[str] | None = None,
                     indices: np.ndarray | None = None,
                     max_dim: int = 10_000, dtype=np.float32,
                     mesh: Mesh | None = None,
                     progress: Callable[[int, int], Any] | None = None,
                     name: str = "extract features") -> dict[str, np.ndarray]:
  """Eval-mode features of ``source`` (or of ``source[indices]``), as numpy.

  Returns ``{'features': [N, D]}`` plus, for each requested block (``layers``:
  None = no block, ``'all'`` = every block, or a list of block names), its
  activation pooled by :func:`pool_to_dim` and flattened to [N, d < max_dim].
  Rows follow ``indices`` order. Memory: N x (D + sum of pooled dims) x
  itemsize of ``dtype``. ``progress(done, total)`` is called after each batch;
  log lines with an ETA are written regardless. With a ``mesh`` the batch is
  split over all its devices (single process) and ``batch_size`` rounded up to
  a multiple of the device count.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if indices is None:
    indices = np.arange(len(source))
  indices = np.asarray(indices)
  batch_size = min(batch_size, max(len(indices), 1))
  if mesh is not None:
    batch_size = -(-batch_size // mesh.size) * mesh.size
    variables = jax.device_put(variables, parallel.replicated(mesh))

  feature_dim, shapes = output_shapes(module, variables, image_shape(source))
  names = resolve_layers(layers, list(shapes))
  pooled = {k: pool_to_dim(shapes[k], max_dim) for k in names}
  out_dims = {FEATURES: int(feature_dim)}
  out_dims.update({k: math.prod(pooled[k]) for k in names})
  for k in names:
    logging.info("%s: block %s %s -> pooled %s (%d dims)", name, k, shapes[k],
                 pooled[k], out_dims[k])

  apply = _extract_fn(module, tuple((k, pooled[k][:2]) for k in names))
  return map_batches(lambda images: apply(variables, images), source, indices,
                     batch_size=batch_size, out_dims=out_dims, dtype=dtype,
                     mesh=mesh, name=name, progress=progress)
