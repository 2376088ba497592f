"""The frozen Sobel front end, and its folding into the first convolution for export.

DeepCluster/DeeperCluster feed the network image gradients instead of colours so that
clustering cannot latch onto colour (DeepCluster §4.1): grayscale (average of the
channels), then the two fixed 3×3 kernels ``[[1,0,-1],[2,0,-2],[1,0,-1]]`` and its
transpose (cross-correlation, as torch's conv). These are constants, not parameters.

Padding, and why the folded network is *exactly* the original one
-----------------------------------------------------------------
grayscale → Sobel → conv1 are all linear, so they compose into one (k+2)×(k+2) conv on
the C-channel image. The naive stack — Sobel with SAME padding, then conv1 with SAME
padding — does not fold exactly: conv1 pads the Sobel *output* with zeros, whereas a
folded conv sees the Sobel responses of the zero-padded image there, which are not zero
next to an edge: the outer ring of conv1's output differs (108 of 784 pixels at 28×28).

So the Sobel stage here pads the grayscale image by ``p + 1`` zeros (p = conv1's padding)
and correlates VALID, giving a map 2p pixels larger than the image (the genuine Sobel
responses extend p pixels beyond the edge); conv1 then runs VALID on it. The output size
is the same as conv1 with padding p on the image, and every number in the composition is
a Sobel response of the zero-padded (normalised) image, which the folded conv — kernel
k+2, padding p+1, same stride — reproduces exactly. Cost: the Sobel map is 2p pixels
wider, and conv1's "padding" carries gradient information instead of zeros, which is the
more natural border anyway.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Name of the first conv-BN-ReLU module of every backbone (backbone.py), the one that
# reads the Sobel map and absorbs it when folded.
FIRST_CONV = "conv1_1"

SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
SOBEL_Y = SOBEL_X.T.copy()
# HWIO: one grayscale input channel, two outputs (x- and y-gradient).
SOBEL_KERNEL = np.stack([SOBEL_X, SOBEL_Y], axis=-1)[:, :, None, :]


def grayscale(x: jax.Array) -> jax.Array:
  """[..., C] → [..., 1]: the mean over channels (1×1 conv with weights 1/C, no bias)."""
  return jnp.mean(x, axis=-1, keepdims=True)


def sobel(x: jax.Array, pad: int = 1) -> jax.Array:
  """[B, H, W, C] → [B, H+2·pad-2, W+2·pad-2, 2]: grayscale, zero-pad by ``pad``, Sobel.

  ``pad=1`` gives the usual SAME-size map; the backbone uses ``pad = p1 + 1`` (see module
  docstring). Channel 0 is the response to SOBEL_X (horizontal gradient), 1 to SOBEL_Y.
  """
  g = grayscale(x)
  return jax.lax.conv_general_dilated(
      g, jnp.asarray(SOBEL_KERNEL, g.dtype), window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def fold_kernel(conv1_kernel: np.ndarray, in_channels: int) -> np.ndarray:
  """conv1's [k, k, 2, O] kernel → the [k+2, k+2, C, O] kernel of grayscale∘Sobel∘conv1.

  y[i] = Σ_a W1[a]·s[i+a], s[m] = Σ_u S[u]·g[m+u], g = mean_c x_c
  ⇒ y[i] = Σ_{a,u} W1[a]·S[u]/C · x[i+a+u], i.e. K[a+u] += W1[a]·S[u]/C.
  Accumulated in float64 so the folding adds no rounding of its own.
  """
  w1 = np.asarray(conv1_kernel, np.float64)
  k, _, two, out = w1.shape
  if two != 2:
    raise ValueError(f"fold_sobel expects conv1 to read the 2 Sobel channels, got {two}.")
  folded = np.zeros((k + 2, k + 2, out), np.float64)
  for u in range(3):
    for v in range(3):
      # Σ_j S[u, v, j] · W1[a, b, j, o], placed at offset (u, v).
      folded[u:u + k, v:v + k] += np.einsum(
          "j,abjo->abo", SOBEL_KERNEL[u, v, 0].astype(np.float64), w1)
  kernel = np.repeat(folded[:, :, None, :] / in_channels, in_channels, axis=2)
  return kernel.astype(np.asarray(conv1_kernel).dtype)


def fold_sobel(model_config: Any, variables: Mapping[str, Any],
               in_channels: int | None = None) -> tuple[Any, dict]:
  """Returns (config, variables) of the same network without the Sobel stage.

  The folded config has ``sobel=False, folded_sobel=True``: its first conv has a
  (k+2)×(k+2) kernel with padding p+1 on the normalised C-channel image. Outputs equal
  the original's up to float rounding (everywhere, borders included).
  ``in_channels``: channels of the images the folded model will be fed; default
  ``len(model.mean)`` (1 for Fashion-MNIST's ``(0.286,)``, 3 for an RGB mean).
  """
  if not model_config.sobel:
    raise ValueError("fold_sobel needs model.sobel=True; this network has no Sobel stage.")
  if in_channels is None:
    in_channels = len(tuple(model_config.mean))
  params = jax.tree_util.tree_map(np.asarray, dict(variables["params"]))
  first = dict(params[FIRST_CONV])
  conv = dict(first["conv"])
  conv["kernel"] = fold_kernel(conv["kernel"], in_channels)
  first["conv"] = conv
  params[FIRST_CONV] = first
  folded_variables = dict(variables)
  folded_variables["params"] = params
  folded_config = copy.deepcopy(model_config)
  with folded_config.unlocked():
    folded_config.sobel = False
    folded_config.folded_sobel = True
  return folded_config, folded_variables
