"""Backbones (flax.linen): VGG-16-BN, AlexNet-BN and small CPU convnets, Sobel front end.

``build_backbone(config.model)`` → a module called as
``module.apply(variables, images_01_nhwc, train=..., rngs={'dropout': key})`` returning
``(features [B, D], blocks {'conv1': [B, h, w, c], ...})``; ``fold_sobel`` removes the
Sobel stage for export by folding it into the first conv.
"""
from deeper_jax.models.architectures import ARCHITECTURES, build_backbone
from deeper_jax.models.backbone import Backbone, ConvBNReLU, ConvSpec, Stage
from deeper_jax.models.sobel import fold_sobel, sobel

__all__ = ["ARCHITECTURES", "Backbone", "ConvBNReLU", "ConvSpec", "Stage", "build_backbone",
           "fold_sobel", "sobel"]
