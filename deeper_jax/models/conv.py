"""A 2-D convolution with a switchable implementation (``model.conv_impl``).

* ``amx``: forward, input gradient and kernel gradient as AMX kernels (``amx_conv.py``;
  float32 operands split into bf16 hi + lo, relative error ~1e-5 of float32's result).
  Stride-1 float32 convs with padding < k and ≥ ``MIN_CHANNELS_FOR_ROWS`` input
  channels; others (an RGB or Sobel first layer, AlexNet's stride-4 conv1, bf16
  compute) go the ``hybrid`` way. 1.3–2.75× faster than oneDNN's float32 per VGG
  layer and pass on this project's 2-core Sapphire Rapids, the whole VGG-16-BN step
  1.36–1.56× PyTorch (benchmarks/README.md, "train step"). The CPU default where the
  CPU has AMX.
* ``xla``: ``lax.conv_general_dilated`` for everything. The fast path on GPU/TPU.
* ``hybrid``: XLA's conv for the forward pass and the input gradient, but the kernel
  gradient as one GEMM (``kernel_grad_by_gemm``); images of ≤ ``SMALL_IMAGE`` pixels go
  the ``patches`` way. On CPU, XLA's forward and input-gradient convs ran 1.3–1.4×
  slower than PyTorch's oneDNN ones, its kernel gradient (lowered as a convolution with
  an H×W window) 1.5–7× slower; the GEMM form narrows the latter most
  (benchmarks/README.md, "train step"). The CPU default without AMX.
* ``patches``: im2col (k² shifted copies concatenated along channels) × kernel matrix,
  differentiated by XLA. On its own slower at VGG's sizes (the copies cost more than the
  GEMM saves); ``hybrid`` uses it for tiny images only.

All read the same parameters (``kernel`` [kh, kw, C_in, C_out], ``bias``), so a
checkpoint trained with one runs with any other.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn

from deeper_jax.models import amx_conv

CONV_IMPLS = ("auto", "xla", "patches", "hybrid", "amx")


def resolve_conv_impl(conv_impl: str) -> str:
  """'auto' → the implementation measured fastest on the default backend.

  'amx' on CPUs with AMX, 'hybrid' on other CPUs (see benchmarks/README.md, "train
  step"), 'xla' elsewhere. An explicit 'amx' where the kernels cannot run is an error
  that says why.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  on_cpu = jax.default_backend() == "cpu"
  if conv_impl == "amx":
    why = amx_conv.unavailable_reason() if on_cpu else "the default backend is not a CPU"
    if why:
      raise ValueError(f"model.conv_impl='amx' is not available: {why}; use 'auto'.")
    return conv_impl
  if conv_impl != "auto":
    return conv_impl
  if not on_cpu:
    return "xla"
  why = amx_conv.unavailable_reason()
  if why:
    _log_fallback_once(why)
    return "hybrid"
  return "amx"


@functools.cache
def _log_fallback_once(why: str) -> None:
  logging.info("Convolutions use conv_impl='hybrid' (XLA): the AMX kernels: %s.", why)


def he_fan_out_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                    ) -> jax.Array:
  """normal(0, sqrt(2 / (kh·kw·C_out))), the init of the reference VGG/AlexNet code."""
  kh, kw, _, c_out = shape
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / (kh * kw * c_out)).astype(dtype)


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_grad_by_gemm(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int
                        ) -> jax.Array:
  """dL/dkernel of a stride-1 conv as one GEMM, without a full im2col.

  dK[i, j] = Σ_{b,h,w} xp[b, h+i, w+j] ⊗ dy[b, h, w]. The k column shifts of x are
  stacked along channels (t: [B, Hp, W, k·C], k× the input instead of k²×) and the k
  row shifts are applied to dy instead (dy zero-padded by i rows above, k-1-i below,
  stacked: [B, Hp, W, k·C_out]), so one GEMM ``dys^T @ t`` with a long contraction
  gives every (i, j) block at once: G[i, o, j, c] = dK[i, j, c, o]. XLA CPU's own
  kernel gradient (a convolution with a H×W window) ran 1.6–2.3× slower on VGG's
  middle layers (2 threads, batch 8: 56²×128→128 123 vs 70 ms, 28²×256→256 116 vs
  48 ms); one GEMM beat k GEMMs with t on the left by 5–20% (108 vs 132 ms at 112²×64).
  """
  k, p = kernel_size, padding
  ho, wo = dy.shape[1], dy.shape[2]
  c, c_out = x.shape[-1], dy.shape[-1]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  hp = xp.shape[1]
  # stack on a new axis, then merge: XLA CPU emits this copy ~2× faster than a concat
  # along the channel axis (71 vs 141 ms for a 78 MB result, one thread).
  t = jnp.stack([xp[:, :, j:j + wo] for j in range(k)], axis=-2).reshape(-1, k * c)
  dys = jnp.stack([jnp.pad(dy, ((0, 0), (i, hp - ho - i), (0, 0), (0, 0))) for i in range(k)],
                  axis=-2).reshape(-1, k * c_out)
  g = jax.lax.dot_general(dys, t, (((0,), (0,)), ((), ())))  # [k·C_out, k·C]
  return g.reshape(k, c_out, k, c).transpose(0, 2, 3, 1)


# Below this many input channels (an RGB or Sobel first layer) XLA's own kernel gradient
# is faster: 16 vs 76 ms for 112²×3→64, where the copies dominate a tiny GEMM.
MIN_CHANNELS_FOR_ROWS = 16


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def hybrid_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """XLA's conv forward and input gradient; the kernel gradient as GEMMs (stride 1)."""
  return _xla_conv(x, kernel, stride, padding)


def _hybrid_fwd(x, kernel, stride, padding):
  return _xla_conv(x, kernel, stride, padding), (x, kernel)


def _hybrid_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  _, x_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, stride, padding), x)
  (dx,) = x_vjp(dy)
  if stride == 1 and x.shape[-1] >= MIN_CHANNELS_FOR_ROWS:
    dk = kernel_grad_by_gemm(x, dy, kernel.shape[0], padding).astype(kernel.dtype)
  else:
    _, k_vjp = jax.vjp(lambda k_: _xla_conv(x, k_, stride, padding), kernel)
    (dk,) = k_vjp(dy)
  return dx, dk


hybrid_conv.defvjp(_hybrid_fwd, _hybrid_bwd)


def im2col(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int]
           ) -> jax.Array:
  """[B, H, W, C] (already padded) → [B, H', W', kh·kw·C], ordered (kh, kw, C).

  The (kh, kw, C) order matches a row-major reshape of an HWIO kernel, so the conv is
  ``im2col(x) @ kernel.reshape(-1, C_out)``. Built from strided slices rather than
  ``lax.conv_general_dilated_patches`` (which is itself a convolution and as slow as one).
  """
  kh, kw = kernel_size
  sh, sw = strides
  _, h, w, _ = x.shape
  out_h = (h - kh) // sh + 1
  out_w = (w - kw) // sw + 1
  cols = []
  for i in range(kh):
    for j in range(kw):
      cols.append(jax.lax.slice(
          x, (0, i, j, 0),
          (x.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, x.shape[3]),
          (1, sh, sw, 1)))
  if len(cols) == 1:
    return cols[0]
  b, oh, ow, c = cols[0].shape
  # stack + merge rather than concat on channels: a faster copy on XLA CPU.
  return jnp.stack(cols, axis=-2).reshape(b, oh, ow, kh * kw * c)


# ``hybrid`` runs images of at most this many pixels as ``patches``: XLA CPU sends 3×3
# convs over tiny images to a slow generic kernel. fwd+bwd, ms, 2 threads: 8×2×2×512→512
# 165 vs 2.8 (forward alone 84 vs 1); 8×1×1×512 7.2 vs 2.0; 8×3×3×512 12.6 vs 4.8;
# 8×4×4×512 15.5 vs 7.7; 256×4×4×64 8.0 vs 6.2. From 7×7 up it depends on batch and
# channels (256×7×7×64: 27 vs 36; 8×7×7×512: 34 vs 21), so the rule stops at 4×4.
# VGG-16 on 32-px inputs (last block 2×2): 0.70 → 0.17 s/step, batch 8.
SMALL_IMAGE = 16


class Conv2D(nn.Module):
  """Conv with explicit symmetric zero padding, bias, and a switchable implementation."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.kernel_size, self.stride, self.padding
    kernel = self.param("kernel", he_fan_out_init, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    impl = resolve_conv_impl(self.conv_impl)
    if impl == "amx" and not (s == 1 and p < k and x.shape[-1] >= MIN_CHANNELS_FOR_ROWS
                              and jnp.dtype(self.dtype) == jnp.float32):
      impl = "hybrid"
    if impl == "hybrid" and x.shape[1] * x.shape[2] <= SMALL_IMAGE:
      impl = "patches"
    if impl == "amx":
      y = amx_conv.amx_conv(x, kernel, p)
    elif impl == "xla":
      y = _xla_conv(x, kernel, s, p)
    elif impl == "hybrid":
      y = hybrid_conv(x, kernel, s, p)
    else:
      if p:
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
      if k == 1 and s == 1:
        cols = x
      else:
        cols = im2col(x, (k, k), (s, s))
      y = jnp.dot(cols, kernel.reshape(-1, self.features))
    return y + bias.astype(self.dtype)
