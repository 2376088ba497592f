"""Classification heads read by the DeeperCluster loss.

Two kinds of head sit on top of the backbone's features ``f = relu(fc7)``:

* ``V``: one linear layer over the ``S = R·m`` super-classes (rotation × super-cluster).
* ``W``: one linear layer *per super-class* over its ``k_sub`` sub-clusters, stored as a
  single array ``[S, D, k_sub]`` so that the sub-logits of a batch laid out ``[S, b, D]``
  are one batched contraction, and so that the array can be split over devices along
  ``S`` (each device group only ever needs the heads of its own super-classes).

The flat loss of the paper's eq. 4 uses a single head ``U`` over ``S·k_sub`` classes.

Label ids mean nothing across two clusterings, so heads are re-drawn after every
reclustering, with ``method.head_init`` (models/initializers.py): 'torch' — PyTorch's
default ``nn.Linear`` init, which DeeperCluster's code keeps — or 'normal' N(0, 0.01)
with zero bias, DeepCluster's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deeper_jax.models import initializers


def _linear(rng: jax.Array, shape: tuple[int, ...], bias_shape: tuple[int, ...],
            scheme: str) -> dict:
  kernel_init, bias_init = initializers.linear_init(scheme, fan_in=shape[-2])
  k_kernel, k_bias = jax.random.split(rng)
  return {"kernel": kernel_init(k_kernel, shape), "bias": bias_init(k_bias, bias_shape)}


def init_heads(rng: jax.Array, feature_dim: int, num_super: int, num_sub: int,
               loss: str = "hierarchical", init: str = "torch") -> dict:
  """Fresh heads for ``num_super`` super-classes of ``num_sub`` sub-classes each."""
  k_v, k_w = jax.random.split(rng)
  if loss == "flat":
    return {"U": _linear(k_w, (feature_dim, num_super * num_sub), (num_super * num_sub,), init)}
  return {"V": _linear(k_v, (feature_dim, num_super), (num_super,), init),
          "W": _linear(k_w, (num_super, feature_dim, num_sub), (num_super, num_sub), init)}


def super_logits(heads: dict, f: jax.Array) -> jax.Array:
  """``[S, b, D] -> [S, b, S]``: every image scored against every super-class."""
  return jnp.einsum("sbd,dt->sbt", f, heads["V"]["kernel"]) + heads["V"]["bias"]


def sub_logits(heads: dict, f: jax.Array) -> jax.Array:
  """``[S, b, D] -> [S, b, k_sub]``: slice ``s`` is scored by its own head ``W_s``."""
  w = heads["W"]
  return jnp.einsum("sbd,sdk->sbk", f, w["kernel"]) + w["bias"][:, None, :]


def flat_logits(heads: dict, f: jax.Array) -> jax.Array:
  """``[S, b, D] -> [S, b, S·k_sub]`` for the Cartesian-product loss (eq. 4)."""
  return jnp.einsum("sbd,dc->sbc", f, heads["U"]["kernel"]) + heads["U"]["bias"]
