"""One backbone module for every network: normalise → [Sobel] → conv stages → fc6 → fc7.

VGG-16-BN, AlexNet-BN and the small CPU nets differ only in their table of stages
(``architectures.py``), so they share this code, their parameter naming, the Sobel
handling and the per-block outputs that the linear probes read.

Parameter names: stage i's j-th conv is ``conv{i}_{j}`` holding ``conv`` (kernel, bias)
and ``bn`` (scale, bias; running mean/var in ``batch_stats``); then ``fc6``, ``fc7``.
Block ``conv{i}`` is stage i's output *after* its max-pool (if it has one).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from deeper_jax.models import initializers
from deeper_jax.models.sobel import sobel


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  features: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1


@dataclasses.dataclass(frozen=True)
class Stage:
  """Convs (each conv-BN-ReLU), then an optional VALID max-pool (window, stride)."""
  convs: tuple[ConvSpec, ...]
  pool: tuple[int, int] | None = (2, 2)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """VALID max-pool; non-overlapping pools (VGG's 2×2/2) as reshape + max.

  Why: XLA CPU's reduce_window gradient (select-and-scatter) is slow: fwd+bwd of a
  2×2 pool on [8, 112, 112, 64] took 135 ms vs 53 ms for the reshape form, whose
  gradient is an elementwise mask. Forward values are identical; ties share the
  gradient instead of one winner taking it (after a ReLU, ties are zeros, whose gradient
  the ReLU kills anyway).
  """
  if window == stride:
    b, h, w, c = x.shape
    oh, ow = h // window, w // window
    x = x[:, :oh * window, :ow * window]
    return x.reshape(b, oh, window, ow, window, c).max(axis=(2, 4))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


class ConvBNReLU(nn.Module):
  """One conv layer as the reference builds it: conv (bias) → BatchNorm → ReLU.

  Its output, before any max-pool, is what the paper's linear probes read
  (``capture_intermediates`` on this module; evaluate/probe_paper.py).
  """
  spec: ConvSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s = self.spec
    x = nn.Conv(s.features, (s.kernel, s.kernel), strides=(s.stride, s.stride),
                padding=((s.padding, s.padding), (s.padding, s.padding)),
                kernel_init=initializers.conv_kernel_init, dtype=self.dtype, name="conv")(x)
    # PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 here).
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


class Backbone(nn.Module):
  """``apply(variables, images, train=..., rngs={'dropout': key})`` → (features, blocks).

  images: float in [0, 1], shape [..., H, W, C] (any leading batch dims).
  features: [..., feature_dim] float32, fc7 before any ReLU.
  blocks: {'conv1': [..., h, w, c], ...} in stage order.
  BatchNorm statistics are over the whole batch: under ``jit`` with a batch sharded
  over devices, a mean over the batch axis is a global mean.
  """
  stages: tuple[Stage, ...]
  feature_dim: int
  dropout: float = 0.5
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.5,)
  sobel: bool = False
  folded_sobel: bool = False
  fc_init: str = "torch"
  dtype: Any = jnp.float32

  def normalise(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    for name, v in (("mean", self.mean), ("std", self.std)):
      if len(v) not in (1, c):
        raise ValueError(f"model.{name} has {len(v)} entries but images have {c} channels; "
                         f"give 1 or {c} values.")
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def first_conv(self, spec: ConvSpec) -> ConvSpec:
    """conv1_1 as it runs: VALID after the Sobel map, or widened by folding (sobel.py)."""
    if self.sobel:
      return dataclasses.replace(spec, padding=0)
    if self.folded_sobel:
      return dataclasses.replace(spec, kernel=spec.kernel + 2, padding=spec.padding + 1)
    return spec

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if images.ndim < 4:
      raise ValueError(f"images must be [..., H, W, C] with a batch axis, got shape "
                       f"{images.shape}.")
    if self.sobel and self.folded_sobel:
      raise ValueError("model.sobel and model.folded_sobel are exclusive; a folded network "
                       "already contains the Sobel stage in conv1_1.")
    lead = images.shape[:-3]
    x = images.reshape((-1,) + images.shape[-3:]).astype(jnp.float32)
    x = self.normalise(x)
    if self.sobel:
      x = sobel(x, pad=self.stages[0].convs[0].padding + 1)
    blocks = {}
    for i, stage in enumerate(self.stages, start=1):
      for j, spec in enumerate(stage.convs, start=1):
        if (i, j) == (1, 1):
          spec = self.first_conv(spec)
        x = ConvBNReLU(spec, self.dtype, name=f"conv{i}_{j}")(x, train)
      if stage.pool is not None:
        x = max_pool(x, *stage.pool)
      blocks[f"conv{i}"] = x
    x = x.reshape(x.shape[0], -1)
    kernel_init, bias_init = initializers.linear_init(self.fc_init, x.shape[-1])
    x = nn.Dense(self.feature_dim, dtype=self.dtype, kernel_init=kernel_init,
                 bias_init=bias_init, name="fc6")(x)
    x = nn.relu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    kernel_init, bias_init = initializers.linear_init(self.fc_init, self.feature_dim)
    x = nn.Dense(self.feature_dim, dtype=self.dtype, kernel_init=kernel_init,
                 bias_init=bias_init, name="fc7")(x)
    features = x.astype(jnp.float32).reshape(lead + (self.feature_dim,))
    blocks = {k: v.reshape(lead + v.shape[1:]) for k, v in blocks.items()}
    return features, blocks
