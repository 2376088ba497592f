"""The pure, jitted DeeperCluster train step and the state it threads.

``(state, batch, rng) -> (state, metrics)``; the state is donated, so parameters are
updated in place. Layout on the ``('super', 'data')`` mesh:

* batch ``[S, b, ...]`` split on both axes: each device holds images of its own
  super-classes only;
* sub-heads ``W [S, D, k_sub]`` (and their momentum) split on ``super``: the paper's
  communication groups; a 16×4096×80k head never sits whole on one device;
* backbone, BatchNorm statistics and ``V`` replicated.

BatchNorm statistics are computed over the *global* batch: under ``jit`` a mean over
a sharded axis is a global mean. Local statistics would leak the label, since each
device's slice holds a single super-class.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deeper_jax import augment
from deeper_jax import parallel
from deeper_jax.losses import LOSSES


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any           # backbone
  batch_stats: Any      # backbone BatchNorm statistics
  heads: Any            # V and W (or U for the flat loss)
  opt_state: Any        # backbone optimiser: kept across reclusterings
  head_opt_state: Any   # head optimiser: reset with the heads


def make_optimizer(train_config) -> optax.GradientTransformation:
  """SGD with momentum and (coupled) weight decay, constant lr as in the paper."""
  return optax.chain(
      optax.add_decayed_weights(train_config.weight_decay),
      optax.sgd(train_config.learning_rate, momentum=train_config.momentum))


def _is_sub_head(path) -> bool:
  return any(getattr(k, "key", None) == "W" for k in path)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Everything replicated except the sub-heads ``W`` and their optimiser slots."""
  def spec(path, leaf):
    if _is_sub_head(path) and getattr(leaf, "ndim", 0) >= 1:
      return NamedSharding(mesh, P(parallel.SUPER))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(spec, state)


def batch_shardings(mesh: Mesh) -> dict:
  both = NamedSharding(mesh, P(parallel.SUPER, parallel.DATA))
  return {"images": both, "sub_labels": both}


def make_train_step(model, tx: optax.GradientTransformation,
                    head_tx: optax.GradientTransformation, *, num_rotations: int,
                    loss: str, crop_pad: int, mesh: Mesh,
                    state_sharding: TrainState) -> Callable:
  """Builds the jitted step for one model/optimiser/mesh."""
  loss_fn = LOSSES[loss]
  replicated = NamedSharding(mesh, P())

  def step(state: TrainState, batch: dict, rng: jax.Array):
    images = batch["images"]
    num_super, b = images.shape[:2]
    aug_rng, dropout_rng = jax.random.split(rng)
    x = images.astype(jnp.float32).reshape((num_super * b,) + images.shape[2:]) / 255.0
    x = augment.random_flip_crop(aug_rng, x, crop_pad)
    x = augment.rotate_slices(x.reshape(images.shape), num_rotations)
    x = x.reshape((num_super * b,) + images.shape[2:])

    def objective(params, heads):
      (features, _), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      value, metrics = loss_fn(heads, features.reshape(num_super, b, -1),
                               batch["sub_labels"])
      return value, (metrics, updates["batch_stats"])

    grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    (_, (metrics, batch_stats)), (g_params, g_heads) = grad_fn(state.params, state.heads)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    head_updates, head_opt_state = head_tx.update(g_heads, state.head_opt_state, state.heads)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        heads=optax.apply_updates(state.heads, head_updates),
        opt_state=opt_state,
        head_opt_state=head_opt_state)
    return new_state, metrics

  return jax.jit(step, donate_argnums=0,
                 in_shardings=(state_sharding, batch_shardings(mesh), replicated),
                 out_shardings=(state_sharding, replicated))
