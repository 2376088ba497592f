"""The stage tables of each network, and ``build_backbone(model_config)``.

``model.width`` is the channel count of the first conv; the other stages scale with it
in the reference proportions (VGG-16: 64, AlexNet: 96, small nets: 32 by default), so a
test can build a thin VGG with the same structure.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from deeper_jax.models.backbone import Backbone, ConvSpec, Stage
from deeper_jax.models.conv import CONV_IMPLS

# VGG config "D" (Simonyan & Zisserman), as in the DeeperCluster reference: 13 convs.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# DeepCluster's AlexNet: (out, kernel, stride, padding), max-pool 3/2 after 1, 2 and 5.
ALEXNET_CONVS = ((96, 11, 4, 2), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1),
                 (256, 3, 1, 1))
ALEXNET_POOLED = (True, True, False, False, True)


def _scale(channels: int, width: int, base: int) -> int:
  return max(1, round(channels * width / base))


def vgg16_bn_stages(width: int = 64) -> tuple[Stage, ...]:
  """5 stages of 3×3 conv-BN-ReLU (padding 1), each closed by a 2×2/2 max-pool."""
  return tuple(Stage(tuple(ConvSpec(_scale(c, width, 64)) for c in stage), (2, 2))
               for stage in VGG16_STAGES)


def alexnet_bn_stages(width: int = 96) -> tuple[Stage, ...]:
  """One conv per stage (blocks conv1..conv5), 3×3/2 max-pools after conv1, 2, 5."""
  return tuple(
      Stage((ConvSpec(_scale(c, width, 96), k, s, p),), (3, 2) if pooled else None)
      for (c, k, s, p), pooled in zip(ALEXNET_CONVS, ALEXNET_POOLED))


def small_cnn_stages(width: int = 32) -> tuple[Stage, ...]:
  """3 stages of one 3×3 conv-BN-ReLU + 2×2 max-pool, widths w, 2w, 4w.

  28×28 → 14 → 7 → 3 (blocks of 6272, 3136, 1152 values at w=32); 32×32 → 16 → 8 → 4.
  Small enough that a 2-core CPU trains an epoch of Fashion-MNIST in minutes.
  """
  return tuple(Stage((ConvSpec(width * m),), (2, 2)) for m in (1, 2, 4))


# name → (stage builder, default width, default feature_dim)
ARCHITECTURES: dict[str, tuple[Callable[[int], tuple[Stage, ...]], int, int]] = {
    "small_cnn28": (small_cnn_stages, 32, 256),
    "small_cnn32": (small_cnn_stages, 32, 256),
    "alexnet_bn": (alexnet_bn_stages, 96, 4096),
    "vgg16_bn": (vgg16_bn_stages, 64, 4096),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _getter(config: Any) -> Callable[[str, Any], Any]:
  """Field reader for a ConfigDict, a dict or any object; missing or None → default."""
  def get(name: str, default: Any) -> Any:
    if hasattr(config, "get"):
      value = config.get(name, default)
    else:
      value = getattr(config, name, default)
    return default if value is None else value
  return get


def build_backbone(model_config: Any) -> Backbone:
  """The backbone named by ``model_config.name``.

  Fields read (all but ``name`` optional): width (0 = the network's default),
  feature_dim (0 = default: 4096 for VGG/AlexNet, 256 for small nets), dropout (0.5),
  mean / std (tuples, default (0.5,)), sobel (False), folded_sobel (False; set by
  ``fold_sobel``), conv_impl ('auto' | 'xla' | 'patches' | 'hybrid' | 'amx'), dtype ('float32' |
  'bfloat16', the compute dtype; params stay float32), bn_axis_name (None).
  """
  get = _getter(model_config)
  name = get("name", None)
  if name not in ARCHITECTURES:
    raise ValueError(f"model.name must be one of {sorted(ARCHITECTURES)}, got {name!r}.")
  stages_fn, default_width, default_dim = ARCHITECTURES[name]
  conv_impl = get("conv_impl", "auto")
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  dtype = get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  dropout = float(get("dropout", 0.5))
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.dropout must be in [0, 1), got {dropout}.")
  return Backbone(
      stages=stages_fn(int(get("width", 0)) or default_width),
      feature_dim=int(get("feature_dim", 0)) or default_dim,
      dropout=dropout,
      mean=tuple(float(v) for v in get("mean", (0.5,))),
      std=tuple(float(v) for v in get("std", (0.5,))),
      sobel=bool(get("sobel", False)),
      folded_sobel=bool(get("folded_sobel", False)),
      conv_impl=conv_impl,
      dtype=DTYPES[dtype],
      bn_axis_name=get("bn_axis_name", None),
  )
