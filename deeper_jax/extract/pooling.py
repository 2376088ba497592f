"""Average pooling of conv activations below ~10k dims, for the linear probes.

The paper (§5, after Zhang et al.) probes every conv layer with a linear classifier
and, "to reduce the influence of feature dimension", average-pools each activation
"until its dimension is below 10k". Two rules do that here.

* ``pool_to_dim`` / ``pool_features``, for the fast probe (evaluate/probe.py):

  *Adaptive* average pooling (PyTorch ``AdaptiveAvgPool2d`` bins: output cell
  ``i`` of an axis of length ``h`` averages rows ``floor(i*h/s) ..
  ceil((i+1)*h/s) - 1``) to the **largest** output side ``s`` such that
  ``min(h, s) * min(w, s) * c < max_dim``. A block already below ``max_dim``
  is left as is; a block with ``c >= max_dim`` is globally pooled to 1x1xc
  (the only case where the result is not below ``max_dim``).

Adaptive bins rather than a fixed window with stride = window, because a
fixed window leaves ragged borders (7 -> window 2 -> 3.5) and pads or drops
them; with adaptive bins every input cell counts and the output side is the
quantity the rule is about. For VGG-16 at 224 px the two rules agree on the
resulting sizes, and the last block gives the paper's 8192 dimensions
(Table 3: "average-pool the features of the last layer resulting in
representations of 8192 dimensions"):

  ======  ===========  ======  ==========  =====
  block   activation   dim     pooled      dim
  ======  ===========  ======  ==========  =====
  conv1   112x112x64   802816  12x12x64    9216
  conv2   56x56x128    401408  8x8x128     8192
  conv3   28x28x256    200704  6x6x256     9216
  conv4   14x14x512    100352  4x4x512     8192
  conv5   7x7x512      25088   4x4x512     8192
  ======  ===========  ======  ==========  =====

Pooling is a pair of small matrix products (exact, jit-friendly, no ragged
windows).

* ``paper_window`` / ``window_pool`` (the paper's protocol, evaluate/probe_paper.py):
  the reference ``eval_linear.py`` pools each conv layer with a fixed
  ``AvgPool2d(av, stride=av)`` (no padding, the ragged border dropped), ``av``
  chosen per layer so that the output has fewer than 10k values: at 224 px
  conv1-2 av=18 (12x12x64 = 9216), conv3-4 av=14 (8x8x128 = 8192), conv5-7 av=9
  (6x6x256 = 9216), conv8-10 av=6 and conv11-13 av=3 (4x4x512 = 8192).
  ``paper_window`` uses those windows for those activation shapes and otherwise the
  smallest ``av`` below the limit (which is the reference's choice everywhere but
  conv3-4, where 13 and 14 both give 8x8).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def pool_to_dim(shape_hwc: Sequence[int],
                max_dim: int = 10_000) -> tuple[int, int, int]:
  """The (h, w, c) an activation of ``shape_hwc`` is average-pooled to.

  See the module docstring for the rule; this pure function is the single
  place that decides it, so tests and reports can call it without a model.
  """
  if len(shape_hwc) != 3 or min(shape_hwc) < 1:
    raise ValueError(f"shape_hwc must be three positive sizes (h, w, c); "
                     f"got {tuple(shape_hwc)}.")
  if max_dim < 2:
    raise ValueError(f"max_dim must be at least 2; got {max_dim}.")
  h, w, c = (int(v) for v in shape_hwc)
  side = max(h, w)
  while side > 1 and min(h, side) * min(w, side) * c >= max_dim:
    side -= 1
  return min(h, side), min(w, side), c


def _bin_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] averaging matrix of adaptive pooling along one axis."""
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    lo = (i * size) // out
    hi = -((-(i + 1) * size) // out)  # ceil((i + 1) * size / out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Adaptive average pooling of NHWC ``x`` to spatial size ``out_hw``."""
  _, h, w, _ = x.shape
  if (h, w) == tuple(out_hw):
    return x
  mh = jnp.asarray(_bin_matrix(h, out_hw[0]))
  mw = jnp.asarray(_bin_matrix(w, out_hw[1]))
  return jnp.einsum("nhwc,ih,jw->nijc", x, mh, mw)


def pool_features(x: jax.Array, max_dim: int = 10_000) -> jax.Array:
  """Pools an NHWC activation by :func:`pool_to_dim` and flattens it to [N, d]."""
  ph, pw, _ = pool_to_dim(x.shape[1:], max_dim)
  return adaptive_avg_pool(x, (ph, pw)).reshape(x.shape[0], -1)


# eval_linear.py's RegLog windows for VGG-16 at 224 px: (side, channels) -> av.
REFERENCE_WINDOWS = {(224, 64): 18, (112, 128): 14, (56, 256): 9, (28, 512): 6, (14, 512): 3}


def paper_window(shape_hwc: Sequence[int], max_dim: int = 10_000) -> int:
  """The reference's window for its shapes, else the smallest ``av`` with
  ``(h // av) * (w // av) * c < max_dim`` (1 if already below)."""
  h, w, c = (int(v) for v in shape_hwc)
  if h == w and (h, c) in REFERENCE_WINDOWS and max_dim == 10_000:
    return REFERENCE_WINDOWS[(h, c)]
  window = 1
  while window < max(h, w) and (h // window) * (w // window) * c >= max_dim:
    window += 1
  return window


def window_pool(x: jax.Array, window: int) -> jax.Array:
  """``AvgPool2d(window, stride=window)`` of NHWC ``x``, flattened to [N, d]."""
  n, h, w, c = x.shape
  oh, ow = h // window, w // window
  x = x[:, :oh * window, :ow * window].reshape(n, oh, window, ow, window, c)
  return x.mean(axis=(2, 4)).reshape(n, -1)
