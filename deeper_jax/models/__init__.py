"""Backbones (flax.linen): VGG-16-BN, AlexNet-BN and small CPU convnets, Sobel front end.

``build_backbone(model_config)`` → a module called as
``module.apply(variables, images_01_nhwc, train=..., rngs={'dropout': key})`` returning
``(features [B, D], blocks {'conv1': [B, h, w, c], ...})``; ``fold_sobel`` removes the
Sobel stage for export by folding it into the first conv.
"""
from deeper_jax.models.architectures import ARCHITECTURES, build_backbone
from deeper_jax.models.backbone import Backbone, ConvSpec, Stage
from deeper_jax.models.conv import resolve_conv_impl
from deeper_jax.models.sobel import fold_sobel, sobel

__all__ = ["ARCHITECTURES", "Backbone", "ConvSpec", "Stage", "build_backbone",
           "fold_sobel", "resolve_conv_impl", "sobel"]
