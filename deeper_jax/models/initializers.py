"""The weight initialisations of the reference code, by name (``model.fc_init``,
``method.head_init``).

* ``'torch'``: PyTorch's default ``nn.Linear`` init, uniform in ±1/√fan_in for the
  weights *and* the bias. DeeperCluster's code never re-initialises its linear layers,
  so its fc6/fc7 and its super-/sub-class heads start this way.
* ``'normal'``: N(0, 0.01) weights, zero bias: DeepCluster's VGG/AlexNet
  ``_initialize_weights`` for every linear layer, and its classifier head.
* Convolutions are always normal(0, sqrt(2 / (k·k·C_out))) with zero bias (both papers).

fan_in is the second-to-last axis of a kernel: ``[D_in, D_out]`` for a dense layer and
``[S, D, k_sub]`` for a stack of sub-heads (each W_s reads D features).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LINEAR_INITS = ("torch", "normal")
NORMAL_STD = 0.01


def conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                     ) -> jax.Array:
  """normal(0, sqrt(2 / (kh·kw·C_out))) for an HWIO kernel, as both reference codes."""
  kh, kw, _, c_out = shape
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / (kh * kw * c_out)).astype(dtype)


def linear_init(scheme: str, fan_in: int) -> tuple[Callable, Callable]:
  """(kernel_init, bias_init) flax initialisers for a linear layer reading ``fan_in``."""
  if scheme == "torch":
    bound = 1.0 / jnp.sqrt(fan_in)
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    return uniform, uniform
  if scheme == "normal":
    return jax.nn.initializers.normal(NORMAL_STD), jax.nn.initializers.zeros
  raise ValueError(f"linear init must be one of {LINEAR_INITS}, got {scheme!r}.")
