"""The stage tables of each network, and ``build_backbone(model_config)``.

``model.width`` is the channel count of the first conv; the other stages scale with it
in the reference proportions (VGG-16: 64, AlexNet: 96, small nets: 32 by default), so a
test can build a thin VGG with the same structure.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from deeper_jax.models import initializers
from deeper_jax.models.backbone import Backbone, ConvSpec, Stage

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


def build_backbone(model_config: Any) -> Backbone:
  """The backbone that ``config.model`` describes (every field as configs/default.py).

  ``width`` / ``feature_dim`` of 0 mean the network's own (VGG-16: 64 / 4096).
  ``folded_sobel`` is set by export (sobel.fold_sobel), never by hand. Values are
  checked by config_checks before a run; here only what would build a wrong network.
  """
  name = model_config.name
  if name not in ARCHITECTURES:
    raise ValueError(f"model.name must be one of {sorted(ARCHITECTURES)}, got {name!r}.")
  if model_config.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_config.dtype!r}.")
  if model_config.fc_init not in initializers.LINEAR_INITS:
    raise ValueError(f"model.fc_init must be one of {initializers.LINEAR_INITS}, got "
                     f"{model_config.fc_init!r}.")
  stages_fn, default_width, default_dim = ARCHITECTURES[name]
  return Backbone(
      stages=stages_fn(int(model_config.width) or default_width),
      feature_dim=int(model_config.feature_dim) or default_dim,
      dropout=float(model_config.dropout),
      mean=tuple(float(v) for v in model_config.mean),
      std=tuple(float(v) for v in model_config.std),
      sobel=bool(model_config.sobel),
      folded_sobel=bool(model_config.folded_sobel),
      fc_init=model_config.fc_init,
      dtype=DTYPES[model_config.dtype],
  )
