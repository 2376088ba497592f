"""The pure, jitted DeeperCluster train step.

``(state, batch, rng) -> (state, metrics)``; the state is donated, so parameters are
updated in place, and the step's randomness (crops, flips, dropout) is ``rng`` folded
with ``state.step`` inside the step. Layout on the ``('super', 'data')`` mesh:

* batch ``[S, b, ...]`` split on both axes: each device holds images of its own
  super-classes only;
* sub-heads ``W [S, D, k_sub]`` (and their momentum) split on ``super``: the paper's
  communication groups; a 16×4096×80k head never sits whole on one device;
* backbone, BatchNorm statistics and ``V`` replicated.

BatchNorm statistics are computed over the *global* batch: under ``jit`` a mean over
a sharded axis is a global mean. Local statistics would leak the label, since each
device's slice holds a single super-class.

Gradient scale of the sub-heads (``method.sub_head_grad``): in the reference code each
W_s is a DistributedDataParallel module over its own training group, and its loss a
mean over one GPU's images, so W_s's gradient is the mean over the images of
super-class s — while the backbone's and V's are means over the whole batch. A mean
of eq. 5 over the whole ``[S, b]`` batch gives W_s 1/S of that, so with
``'per_group'`` (the default) W's gradient is multiplied by S; ``'global_mean'`` keeps
eq. 5 literally.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deeper_jax import augment
from deeper_jax.runtime import mesh as mesh_lib
from deeper_jax.train.losses import LOSSES
from deeper_jax.train.state import TrainState

SUB_HEAD_GRADS = ("per_group", "global_mean")


def make_optimizer(train_config) -> optax.GradientTransformation:
  """SGD with momentum and (coupled, as torch's) weight decay, constant lr as the paper."""
  return optax.chain(
      optax.add_decayed_weights(train_config.weight_decay),
      optax.sgd(train_config.learning_rate, momentum=train_config.momentum))


def _is_sub_head(path) -> bool:
  return any(getattr(k, "key", None) == "W" for k in path)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Everything replicated except the sub-heads ``W`` and their optimiser slots."""
  def spec(path, leaf):
    if _is_sub_head(path) and getattr(leaf, "ndim", 0) >= 1:
      return NamedSharding(mesh, P(mesh_lib.SUPER))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(spec, state)


def batch_shardings(mesh: Mesh) -> dict:
  both = NamedSharding(mesh, P(mesh_lib.SUPER, mesh_lib.DATA))
  return {"images": both, "sub_labels": both}


def scale_sub_head_grads(grads: dict, num_super: int) -> dict:
  """W's gradient × S: each W_s then gets the mean over its own slice (reference)."""
  if "W" not in grads:
    return grads
  return {**grads, "W": jax.tree.map(lambda g: g * num_super, grads["W"])}


def make_train_step(model, tx: optax.GradientTransformation,
                    head_tx: optax.GradientTransformation, *, method, train_config,
                    image_size: int, mesh: Mesh, state_sharding: TrainState) -> Callable:
  """The jitted step for one model, optimiser pair, method and mesh."""
  loss_fn = LOSSES[method.loss]
  replicated = NamedSharding(mesh, P())

  def step(state: TrainState, batch: dict, rng: jax.Array):
    images = batch["images"]
    num_super, b = images.shape[:2]
    aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    x = images.astype(jnp.float32).reshape((num_super * b,) + images.shape[2:]) / 255.0
    x = augment.training_view(aug_rng, x, image_size, train_config)
    x = augment.rotate_slices(x.reshape((num_super, b) + x.shape[1:]), method.num_rotations)
    x = x.reshape((num_super * b,) + x.shape[2:])

    def objective(params, heads):
      (features, _), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      value, metrics = loss_fn(heads, features.reshape(num_super, b, -1),
                               batch["sub_labels"])
      return value, (metrics, updates["batch_stats"])

    grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    (_, (metrics, batch_stats)), (g_params, g_heads) = grad_fn(state.params, state.heads)
    if method.sub_head_grad == "per_group":
      g_heads = scale_sub_head_grads(g_heads, num_super)
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
