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

Where the rows go (docs/scaling.md): ``extract_rows`` leaves each output on the
devices as :class:`~deeper_jax.cluster.layout.Rows`, in the layout k-means and PCA
read (device ``s`` of the mesh holds rows ``[s*R, (s+1)*R)``), and each device
computes exactly its own rows: each process reads and decodes only the images of
its own devices, and no process ever holds all N rows. ``extract_features`` is the
same followed by a gather of every output to every process, for the evaluators'
(subsampled) sets; with no mesh it runs on one device per process.
``spill_features`` / ``spill_rows`` write the rows to disk as they are computed
instead, each process its own devices' blocks (cluster/spill.py), for features over
``clustering.memory_budget_gb``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deeper_jax import augment
from deeper_jax.cluster import layout, spill
from deeper_jax.cluster.layout import Rows, plan_rows
from deeper_jax.data import pipeline
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


def _padded_plan(indices: np.ndarray, starts: np.ndarray, devices: int, per_device: int,
                 per_device_stride: int) -> np.ndarray:
  """``int [steps, devices, per_device]``: the source index of each row slot of each step.

  Step ``t``'s slot ``j`` of device ``s`` is row ``s * per_device_stride + starts[t] + j``
  of ``indices``; a slot past the last row reads the last image again (its output is
  dropped), so every step decodes full blocks.
  """
  rows = (np.arange(devices)[None, :, None] * per_device_stride + starts[:, None, None]
          + np.arange(per_device)[None, None, :])
  return np.asarray(indices)[np.minimum(rows, len(indices) - 1)]


def map_batches(fn: Callable[[np.ndarray], dict[str, jax.Array]], source,
                indices: np.ndarray, *, batch_size: int, out_dims: dict[str, int],
                dtype=np.float32, name: str = "extract", on_batch=None,
                decode: pipeline.Decode = pipeline.Decode()) -> dict[str, np.ndarray]:
  """Runs ``fn`` over ``source.images(indices)`` in fixed-size batches, into numpy.

  Each process on its own default device; :func:`map_rows` splits the work and the
  outputs over a mesh instead.

  ``fn`` maps a uint8 batch [batch_size, H, W, C] to a dict of [batch_size, d]
  arrays. Images are decoded as ``decode`` says (data/pipeline.py: ahead, in worker
  threads or processes; by default here, while the device computes the previous
  batch: dispatch is asynchronous), and the results are written into preallocated
  numpy arrays, so memory holds one copy of the outputs. ``on_batch(batches_done)``
  is called after each batch.
  """
  n = len(indices)
  outputs = {k: np.empty((n, d), dtype) for k, d in out_dims.items()}
  starts = np.arange(0, n, batch_size)
  plan = _padded_plan(indices, starts, 1, batch_size, 0)
  report = logs.progress(f"{name}: {n} images", len(starts))
  pending, done = None, 0

  def collect(item):
    nonlocal done
    result, start = item
    count = min(batch_size, n - start)
    for k, v in result.items():
      outputs[k][start:start + count] = np.asarray(v[:count], dtype)
    done += 1
    report(done)
    if on_batch is not None:
      on_batch(done)

  feed = decode.batches(source, plan, [(slice(0, 1), slice(0, batch_size))])
  with contextlib.closing(feed):
    for start, (images,) in zip(starts, feed):
      result = fn(images[0])
      if pending is not None:
        collect(pending)
      pending = (result, int(start))
  if pending is not None:
    collect(pending)
  return outputs


@functools.lru_cache(maxsize=32)
def _write_fn(mesh: Mesh, rows_per_shard: int, num_rows: int):
  """Jitted ``(buffer [S*R, d], batch [S*b, d], start) -> buffer``, shard by shard.

  Device ``s`` writes its ``b`` new rows at ``start`` of its own block; rows past
  ``num_rows`` (the padding of the last shard) are written as zeros.
  """
  rows_spec = P(mesh_lib.DATA_AXES)

  def shard_fn(buffer, batch, start):
    first = lax.axis_index(mesh_lib.DATA_AXES) * rows_per_shard + start
    rows = first + jnp.arange(batch.shape[0], dtype=jnp.int32)
    batch = jnp.where((rows < num_rows)[:, None], batch.astype(buffer.dtype), 0)
    return lax.dynamic_update_slice_in_dim(buffer, batch, start, 0)

  return jax.jit(jax.shard_map(shard_fn, mesh=mesh, in_specs=(rows_spec, rows_spec, P()),
                               out_specs=rows_spec, check_vma=False), donate_argnums=0)


def map_rows(fn: Callable[[jax.Array], dict[str, jax.Array]], source, indices: np.ndarray,
             *, batch_size: int, out_dims: dict[str, int], mesh: Mesh, dtype=np.float32,
             image_dtype=np.uint8, name: str = "extract", on_batch=None,
             sink: Callable[[int, dict[str, jax.Array]], None] | None = None,
             decode: pipeline.Decode = pipeline.Decode()) -> dict[str, Rows]:
  """Runs ``fn`` over ``source.images(indices)``; each output stays on the devices as Rows.

  Row ``i`` of every output belongs to device ``i // R`` (``R = ceil(N / S)``), and
  that device computes it: step ``t`` hands device ``s`` the images of rows
  ``s*R + t*b ... + b`` (``b = batch_size / S`` per device, the last step taking the
  last ``b`` rows of the block again). Those blocks are the plan of the input
  pipeline (data/pipeline.py), which decodes this process's devices' blocks only, as
  ``decode`` says (by default in this thread, while the devices compute the previous
  step); ``make_array_from_callback`` assembles the global batch from them. ``fn``
  maps that batch [S*b, H, W, C] (``image_dtype``) split over the mesh to
  ``{name: [S*b, d]}``. ``on_batch(steps_done)`` is called after each step.

  ``sink(start, outputs)``: instead of keeping the outputs on the devices, hand
  each step's (device ``s`` holds rows ``s*R + start ...``) to ``sink``, one step
  behind the devices (cluster/spill.py writes them to disk); returns ``{}``.
  """
  n, shards = len(indices), mesh.size
  if n < 1:
    raise ValueError("no images to extract features of.")
  per_shard = plan_rows(n, shards, 1).rows_per_shard
  per_device = max(1, min(-(-batch_size // shards), per_shard))
  steps = -(-per_shard // per_device)
  starts = np.minimum(np.arange(steps) * per_device, per_shard - per_device)
  # Slots past row n (the last device's padding) read row n - 1; their outputs are
  # written as zeros (_write_fn) or not at all (spill.Writer).
  plan = _padded_plan(indices, starts, shards, per_device, per_shard)
  sharding = mesh_lib.rows_sharding(mesh)
  blocks = pipeline.local_blocks(NamedSharding(mesh, P(mesh_lib.DATA_AXES)), plan.shape[1:])
  image_shape = tuple(source.image_shape)
  buffers = {} if sink else {k: layout.zeros(mesh, (shards * per_shard, d), dtype)
                             for k, d in out_dims.items()}
  write = _write_fn(mesh, per_shard, n)
  report = logs.progress(f"{name}: {n} images", steps)

  def finish(start: int, result: dict, done: int) -> None:
    """A step's outputs are computed: hand them on, report ``done`` steps."""
    jax.block_until_ready(result)
    if sink:
      sink(start, result)
    report(done)
    if on_batch is not None:
      on_batch(done)

  previous = None
  feed = decode.batches(source, plan, blocks)
  with contextlib.closing(feed):
    for step, (start, local) in enumerate(zip(starts, feed)):
      decoded = {block[0].start: images[0].astype(image_dtype, copy=False)
                 for block, images in zip(blocks, local)}
      batch = jax.make_array_from_callback(
          (shards * per_device,) + image_shape, sharding,
          lambda index, decoded=decoded: decoded[(index[0].start or 0) // per_device])
      result = fn(batch)
      position = jax.device_put(np.int32(start), mesh_lib.replicated(mesh))
      buffers = {k: write(buffers[k], result[k], position) for k in buffers}
      if previous is not None:  # one step in flight: report work done, not dispatched
        finish(*previous, step)
      previous = (int(start), result)
  finish(*previous, steps)
  return {k: Rows(v, n) for k, v in buffers.items()}


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


def _prepare(module, variables, source, *, image_size, batch_size, layers, indices,
             pooling_rule, max_dim, mesh, name):
  """(indices, batch size, ``{output: dims}``, ``fn(images) -> outputs``) of an extraction."""
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
  return indices, batch_size, out_dims, lambda images: apply(variables, images)


def extract_rows(module, variables, source, *, mesh: Mesh | None = None,
                 image_size: int | None = None,
                 batch_size: int = 512, layers: str | Sequence[str] = (),
                 indices: np.ndarray | None = None, pooling_rule: str = "adaptive",
                 max_dim: int = 10_000, on_batch=None, name: str = "extract features",
                 decode: pipeline.Decode = pipeline.Decode()) -> dict[str, Rows]:
  """Eval-mode features of ``source`` (or ``source[indices]``), left on the devices.

  The outputs of :func:`extract_features`, each as float32 :class:`Rows` split over
  ``mesh`` (default: all devices; :func:`map_rows`): every process reads only its own
  devices' images and holds only their rows. What clustering reads, on one process
  or many.
  """
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  indices, batch_size, out_dims, fn = _prepare(
      module, variables, source, image_size=image_size, batch_size=batch_size, layers=layers,
      indices=indices, pooling_rule=pooling_rule, max_dim=max_dim, mesh=mesh, name=name)
  return map_rows(fn, source, indices, batch_size=batch_size, out_dims=out_dims, mesh=mesh,
                  name=name, on_batch=on_batch, decode=decode)


def spill_rows(fn: Callable[[jax.Array], dict[str, jax.Array]], source, indices: np.ndarray,
               directory: str, *, output: str, batch_size: int, out_dims: dict[str, int],
               mesh: Mesh, name: str = "extract", on_batch=None,
               decode: pipeline.Decode = pipeline.Decode()) -> spill.Spilled:
  """:func:`map_rows`' ``output`` written to ``directory`` as it comes (cluster/spill.py).

  For features over the memory budget: each process writes the blocks of its own
  devices, one ``.npy`` file each, and keeps no rows; a step's outputs are on the
  devices only until they are written. Files a killed run left are removed first.
  """
  spill.clear(directory)
  writer = spill.Writer(directory, len(indices), out_dims[output], mesh)
  map_rows(fn, source, indices, batch_size=batch_size, out_dims={output: out_dims[output]},
           mesh=mesh, name=name, on_batch=on_batch, decode=decode,
           sink=lambda start, outputs: writer.write(start, outputs[output]))
  return writer.close()


def spill_features(module, variables, source, directory: str, *, mesh: Mesh | None = None,
                   image_size: int | None = None, batch_size: int = 512,
                   on_batch=None, name: str = "extract features",
                   decode: pipeline.Decode = pipeline.Decode()) -> spill.Spilled:
  """The ``'features'`` of :func:`extract_rows`, spilled to ``directory`` (:func:`spill_rows`)."""
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  indices, batch_size, out_dims, fn = _prepare(
      module, variables, source, image_size=image_size, batch_size=batch_size, layers=(),
      indices=None, pooling_rule="adaptive", max_dim=10_000, mesh=mesh, name=name)
  return spill_rows(fn, source, indices, directory, output=FEATURES, batch_size=batch_size,
                    out_dims=out_dims, mesh=mesh, name=name, on_batch=on_batch, decode=decode)


def extract_features(module, variables, source, *, image_size: int | None = None,
                     batch_size: int = 512, layers: str | Sequence[str] = (),
                     indices: np.ndarray | None = None, pooling_rule: str = "adaptive",
                     max_dim: int = 10_000, dtype=np.float32, mesh: Mesh | None = None,
                     on_batch=None, name: str = "extract features",
                     decode: pipeline.Decode = pipeline.Decode()) -> dict[str, np.ndarray]:
  """Eval-mode features of ``source`` (or of ``source[indices]``), as numpy.

  Returns ``{'features': [N, D]}`` plus each requested block or conv layer
  (``layers``: names, or ``'all'`` for every block), pooled and flattened.
  ``image_size``: side of the centre view (default: the source's own). Rows follow
  ``indices``. Memory: N x (D + sum of pooled dims) x itemsize of ``dtype``, on
  every process. With a ``mesh``, :func:`extract_rows` (each device its own rows,
  ``batch_size`` rounded up to a multiple of the device count) then a gather to every
  process; without, batches on one device of each process (:func:`map_batches`).
  ``decode``: how images are decoded (data/pipeline.py; default: in this thread).
  """
  if mesh is not None:
    rows = extract_rows(module, variables, source, mesh=mesh, image_size=image_size,
                        batch_size=batch_size, layers=layers, indices=indices,
                        pooling_rule=pooling_rule, max_dim=max_dim, on_batch=on_batch,
                        name=name, decode=decode)
    return {k: v.to_numpy().astype(dtype, copy=False) for k, v in rows.items()}
  indices, batch_size, out_dims, fn = _prepare(
      module, variables, source, image_size=image_size, batch_size=batch_size, layers=layers,
      indices=indices, pooling_rule=pooling_rule, max_dim=max_dim, mesh=None, name=name)
  return map_batches(fn, source, indices, batch_size=batch_size, out_dims=out_dims,
                     dtype=dtype, name=name, on_batch=on_batch, decode=decode)
