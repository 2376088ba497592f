"""The train state at the start of a run and after each reclustering."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deeper_jax import heads as heads_lib
from deeper_jax import pretrained
from deeper_jax import train_step as step_lib


def num_super_classes(config) -> int:
  return config.method.num_rotations * config.method.num_super_clusters


def init_variables(model, config, image_shape) -> dict:
  """Backbone variables for the config's seed (also the 'random init' baseline)."""
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return dict(jax.jit(lambda r: model.init(r, dummy, train=False))(rng))


def new_heads(state: step_lib.TrainState, config, cycle: int, head_tx,
              feature_dim: int) -> step_lib.TrainState:
  """Fresh sub-heads (and V when m > 1) with fresh optimiser slots after a clustering.

  Cluster ids have no meaning across two clusterings, so the heads that read them
  start over. The rotation-only head V of a single super-cluster keeps its meaning and
  its momentum; the backbone's optimiser state is always kept.
  """
  method = config.method
  rng = jax.random.fold_in(jax.random.key(config.seed), 1_000_000 + cycle)
  heads = heads_lib.init_heads(rng, feature_dim, num_super_classes(config),
                               method.num_sub_clusters, method.loss)
  head_opt_state = head_tx.init(heads)
  if state.heads is not None and method.num_super_clusters == 1 and method.loss != "flat":
    keep = lambda path: any(getattr(k, "key", None) == "V" for k in path)
    pick = lambda path, new, old: old if keep(path) else new
    heads = jax.tree_util.tree_map_with_path(pick, heads, state.heads)
    head_opt_state = jax.tree_util.tree_map_with_path(pick, head_opt_state,
                                                      state.head_opt_state)
  return state.replace(heads=heads, head_opt_state=head_opt_state)


def initial_state(model, config, image_shape, tx, head_tx, feature_dim):
  variables = init_variables(model, config, image_shape)
  if config.train.init_from:
    variables = pretrained.load_backbone_variables(config.train.init_from, variables)
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), heads=None,
      opt_state=tx.init(variables["params"]), head_opt_state=None)
  return new_heads(state, config, 0, head_tx, feature_dim)
