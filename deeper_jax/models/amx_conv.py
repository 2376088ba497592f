"""Stride-1 convolutions on Intel AMX tiles (``native/amx_conv.cc``): ``conv_impl='amx'``.

Why: XLA:CPU's float32 convolutions never reach the AMX units of Sapphire Rapids and
later Xeons; these kernels do, with each float32 operand split into bf16 hi + lo and
hi·hi + lo·hi + hi·lo accumulated in float32. Results are within ~1e-5 (relative to
the largest output) of float32's; per VGG-16 layer (batch 8, 2 threads) forward,
input gradient and kernel gradient each ran 1.3–2.75× faster than PyTorch's oneDNN
float32 (benchmarks/README.md, "train step"; conv_layers_vs_torch.py).

Forward, input gradient and kernel gradient are each one XLA FFI call on CPU, tied
together by a ``custom_vjp``. Each call is wrapped in ``custom_partitioning`` so that
under ``jit`` with a batch-sharded input (the train step's ``('super', 'data')`` mesh,
or many host devices) every device convolves only its own images — without it XLA
would gather the batch and run the whole convolution on every device — and the
kernel gradient is ``psum``-reduced over the batch's mesh axes. The kernels are
deterministic: the same inputs give the same bits whatever the thread count.

Not supported: ``jax.vmap`` over these calls (custom_partitioning has no batching rule;
JAX raises "Batching rule for 'custom_partitioning' not implemented"). The backbone
already folds leading batch dims into one, so only a vmap over the model itself (e.g.
per-example gradients) meets this: use ``model.conv_impl='hybrid'`` there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from deeper_jax import native

CONV_TARGET = "deeper_jax_amx_conv"
GRAD_TARGET = "deeper_jax_amx_conv_kernel_grad"


def unavailable_reason() -> str | None:
  """None if the AMX conv kernels are built, loaded and registered; else why not."""
  return native.unavailable_reason("amx_conv", (CONV_TARGET, GRAD_TARGET))


def _require_kernels() -> None:
  """Builds and registers the kernels on first use; a clear error where they can't run."""
  why = unavailable_reason()
  if why:
    raise RuntimeError(f"The AMX conv kernels are not available: {why}. Use "
                       "model.conv_impl='auto' (falls back to XLA).")


def _conv_call(x, kernel, padding: int, flip: bool):
  """conv(x, kernel); flip: x is dy [B, Ho, Wo, O] and the result dx (padding k-1-p)."""
  _require_kernels()
  b, h, w, _ = x.shape
  k = kernel.shape[0]
  c_out = kernel.shape[2] if flip else kernel.shape[3]
  ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
  call = jax.ffi.ffi_call(CONV_TARGET, jax.ShapeDtypeStruct((b, ho, wo, c_out), jnp.float32))
  return call(x, kernel, padding=np.int64(padding), flip=np.int64(flip))


def _kernel_grad_call(x, dy, kernel_size: int, padding: int):
  _require_kernels()
  shape = (kernel_size, kernel_size, x.shape[-1], dy.shape[-1])
  call = jax.ffi.ffi_call(GRAD_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))
  return call(x, dy, padding=np.int64(padding))


def _batch_axes(arg_shape):
  """The mesh axes the leading (batch) dimension is split over, or None."""
  spec = arg_shape.sharding.spec
  return spec[0] if len(spec) else None


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _conv(x, kernel, padding, flip):
  return _conv_call(x, kernel, padding, flip)


def _conv_partition(padding, flip, mesh, arg_shapes, result_shape):
  rows = NamedSharding(mesh, P(_batch_axes(arg_shapes[0])))
  lower = functools.partial(_conv_call, padding=padding, flip=flip)
  return mesh, lower, rows, (rows, NamedSharding(mesh, P()))


# Only the batch dimension may be split; everything else is gathered first.
_conv.def_partition(_conv_partition, sharding_rule="b h w c, k1 k2 i o -> b h2 w2 o",
                    need_replication_factors=("h", "w", "c", "k1", "k2", "i", "o", "h2", "w2"))


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _kernel_grad(x, dy, kernel_size, padding):
  return _kernel_grad_call(x, dy, kernel_size, padding)


def _kernel_grad_partition(kernel_size, padding, mesh, arg_shapes, result_shape):
  axes = _batch_axes(arg_shapes[0])
  rows = NamedSharding(mesh, P(axes))

  def lower(x, dy):
    dk = _kernel_grad_call(x, dy, kernel_size, padding)
    return dk if axes is None else jax.lax.psum(dk, axes)

  return mesh, lower, NamedSharding(mesh, P()), (rows, rows)


_kernel_grad.def_partition(
    _kernel_grad_partition, sharding_rule="b h w c, b h2 w2 o -> k1 k2 c o",
    reduction_factors=("b",),
    need_replication_factors=("h", "w", "c", "h2", "w2", "o", "k1", "k2"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def amx_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """``conv(x, kernel)``, stride 1, zero padding ``padding`` (at most k - 1, so that the
  input gradient is a convolution too); NHWC, HWIO, float32."""
  check_args(x.shape, kernel.shape, padding)
  return _conv(x, kernel, padding, False)


def check_args(x_shape, kernel_shape, padding: int) -> None:
  if len(x_shape) != 4 or len(kernel_shape) != 4 or kernel_shape[0] != kernel_shape[1]:
    raise ValueError(f"amx_conv takes x [B, H, W, C] and a square kernel [k, k, C, O], got "
                     f"{tuple(x_shape)} and {tuple(kernel_shape)}.")
  if kernel_shape[2] != x_shape[3]:
    raise ValueError(f"amx_conv: the kernel has {kernel_shape[2]} input channels, x has "
                     f"{x_shape[3]}.")
  if not 0 <= padding <= kernel_shape[0] - 1:
    raise ValueError(f"amx_conv supports padding 0..k-1 = {kernel_shape[0] - 1}, got {padding}.")


def _fwd(x, kernel, padding):
  check_args(x.shape, kernel.shape, padding)
  return _conv(x, kernel, padding, False), (x, kernel)


def _bwd(padding, residuals, dy):
  x, kernel = residuals
  k = kernel.shape[0]
  return _conv(dy, kernel, k - 1 - padding, True), _kernel_grad(x, dy, k, padding)


amx_conv.defvjp(_fwd, _bwd)
