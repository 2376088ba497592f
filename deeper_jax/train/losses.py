"""The DeeperCluster objective (paper eq. 5) and its flat variant (eq. 4).

Batches are laid out ``[S, b, ...]``: slice ``s`` holds ``b`` images of super-class
``s`` (super-cluster ``s // R`` under rotation ``s % R``), so the super-class target
of every image in slice ``s`` is ``s`` itself and only its sub-cluster id is data.

eq. 5:  mean_n [ CE(V f_n, y_n) + CE(W_{y_n} f_n, z_n) ].
Since each image belongs to exactly one super-class, the sum over ``s`` in eq. 5
reduces to the single head ``W_{y_n}``, which is what the batched contraction does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from deeper_jax.train import heads as heads_lib


def _ce_and_acc(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  acc = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return ce.mean(), acc.mean()


def _super_targets(shape: tuple[int, int]) -> jax.Array:
  num_super, b = shape
  return jnp.broadcast_to(jnp.arange(num_super)[:, None], (num_super, b))


def hierarchical_loss(heads: dict, features: jax.Array,
                      sub_targets: jax.Array) -> tuple[jax.Array, dict]:
  """Paper eq. 5 on pre-ReLU features ``[S, b, D]`` and sub-cluster ids ``[S, b]``."""
  f = jax.nn.relu(features)
  super_loss, super_acc = _ce_and_acc(heads_lib.super_logits(heads, f),
                                      _super_targets(sub_targets.shape))
  sub_loss, sub_acc = _ce_and_acc(heads_lib.sub_logits(heads, f), sub_targets)
  loss = super_loss + sub_loss
  return loss, {"loss": loss, "super_loss": super_loss, "sub_loss": sub_loss,
                "super_accuracy": super_acc, "sub_accuracy": sub_acc}


def flat_loss(heads: dict, features: jax.Array,
              sub_targets: jax.Array) -> tuple[jax.Array, dict]:
  """Paper eq. 4: one softmax over all ``S·k_sub`` (super-class, sub-cluster) pairs."""
  f = jax.nn.relu(features)
  logits = heads_lib.flat_logits(heads, f)
  num_sub = logits.shape[-1] // sub_targets.shape[0]
  targets = _super_targets(sub_targets.shape) * num_sub + sub_targets
  loss, acc = _ce_and_acc(logits, targets)
  # The super-class part of the prediction, for logs comparable with eq. 5.
  super_acc = (jnp.argmax(logits, -1) // num_sub == targets // num_sub).mean()
  return loss, {"loss": loss, "super_accuracy": super_acc, "sub_accuracy": acc}


LOSSES = {"hierarchical": hierarchical_loss, "flat": flat_loss}
