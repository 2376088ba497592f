"""A 2-D convolution whose computation can be switched between XLA's conv and im2col.

Why two implementations: on GPU/TPU, XLA's native convolution is the fast path. On CPU,
XLA's convolution kernels are several times slower than its matrix multiply (DESIGN §6),
so writing the convolution as "gather the k×k shifted copies of the input, concatenate
them along channels, multiply by the kernel matrix" (im2col) trades memory for a single
large GEMM. Both read the same parameters (``kernel`` [kh, kw, C_in, C_out], ``bias``),
so a checkpoint trained with one runs with the other.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

CONV_IMPLS = ("auto", "xla", "patches")


def resolve_conv_impl(conv_impl: str) -> str:
  """'auto' → the implementation measured fastest on the default backend.

  'patches' on CPU (see benchmarks/README.md, "train step"), 'xla' elsewhere.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  if conv_impl != "auto":
    return conv_impl
  return "patches" if jax.default_backend() == "cpu" else "xla"


def he_fan_out_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                    ) -> jax.Array:
  """normal(0, sqrt(2 / (kh·kw·C_out))), the init of the reference VGG/AlexNet code."""
  kh, kw, _, c_out = shape
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / (kh * kw * c_out)).astype(dtype)


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
  return jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]


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
    if resolve_conv_impl(self.conv_impl) == "xla":
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(s, s), padding=((p, p), (p, p)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      if p:
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
      if k == 1 and s == 1:
        cols = x
      else:
        cols = im2col(x, (k, k), (s, s))
      y = jnp.dot(cols, kernel.reshape(-1, self.features))
    return y + bias.astype(self.dtype)
