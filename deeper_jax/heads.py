"""Classification heads read by the DeeperCluster loss.

Two kinds of head sit on top of the backbone's features ``f = relu(fc7)``:

* ``V``: one linear layer over the ``S = R·m`` super-classes (rotation × super-cluster).
* ``W``: one linear layer *per super-class* over its ``k_sub`` sub-clusters, stored as a
  single array ``[S, D, k_sub]`` so that the sub-logits of a batch laid out ``[S, b, D]``
  are one batched contraction, and so that the array can be split over devices along
  ``S`` (each device group only ever needs the heads of its own super-classes).

The flat loss of the paper's eq. 4 uses a single head ``U`` over ``S·k_sub`` classes.

Label ids mean nothing across two clusterings, so heads are re-drawn after every
reclustering (reference init: normal(0, 0.01), zero bias).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

HEAD_INIT_STD = 0.01


def init_heads(rng: jax.Array, feature_dim: int, num_super: int, num_sub: int,
               loss: str = "hierarchical", *, std: float = HEAD_INIT_STD) -> dict:
  """Fresh heads for ``num_super`` super-classes of ``num_sub`` sub-classes each."""
  k_v, k_w = jax.random.split(rng)
  if loss == "flat":
    return {"U": {
        "kernel": std * jax.random.normal(k_w, (feature_dim, num_super * num_sub)),
        "bias": jnp.zeros((num_super * num_sub,)),
    }}
  return {
      "V": {"kernel": std * jax.random.normal(k_v, (feature_dim, num_super)),
            "bias": jnp.zeros((num_super,))},
      "W": {"kernel": std * jax.random.normal(k_w, (num_super, feature_dim, num_sub)),
            "bias": jnp.zeros((num_super, num_sub))},
  }


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
