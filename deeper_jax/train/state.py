"""The train state: what it holds, how it starts, and how it changes between cycles."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from deeper_jax.train import heads as heads_lib
from deeper_jax.train import schedule


class TrainState(struct.PyTreeNode):
  step: jax.Array       # global train step, across phases and cycles
  params: Any           # backbone
  batch_stats: Any      # backbone BatchNorm statistics
  heads: Any            # V and W (or U for the flat loss)
  opt_state: Any        # backbone optimiser: kept across reclusterings
  head_opt_state: Any   # head optimiser: reset with the heads


@functools.lru_cache(maxsize=8)
def _init_fn(model, image_size: int, channels: int):
  """The compiled init of ``model`` for one input size (compiled once, reused)."""
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return jax.jit(lambda rng: model.init(rng, dummy, train=False))


def init_variables(model, config, channels: int) -> dict:
  """Backbone variables for the config's seed (also the 'random init' baseline)."""
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  return dict(_init_fn(model, config.data.image_size, channels)(rng))


def fresh_heads(config, method, *, phase: int, cycle: int) -> dict:
  """Heads for one clustering of ``method``, drawn from (seed, phase, cycle)."""
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1_000_000 + cycle),
                           phase)
  return heads_lib.init_heads(rng, config.model.feature_dim, schedule.num_super_classes(method),
                              method.num_sub_clusters, method.loss, method.head_init)


def new_heads(state: TrainState, config, method, head_tx, *, phase: int,
              cycle: int) -> TrainState:
  """Fresh sub-heads (and V when m > 1) with fresh optimiser slots after a clustering.

  Cluster ids have no meaning across two clusterings, so the heads that read them
  start over. The rotation-only head V of a single super-cluster keeps its meaning and
  its momentum; the backbone's optimiser state is always kept.
  """
  heads = fresh_heads(config, method, phase=phase, cycle=cycle)
  head_opt_state = head_tx.init(heads)
  if state.heads is not None and method.num_super_clusters == 1 and method.loss != "flat":
    keep = lambda path: any(getattr(k, "key", None) == "V" for k in path)
    pick = lambda path, new, old: old if keep(path) else new
    heads = jax.tree_util.tree_map_with_path(pick, heads, state.heads)
    head_opt_state = jax.tree_util.tree_map_with_path(pick, head_opt_state,
                                                      state.head_opt_state)
  return state.replace(heads=heads, head_opt_state=head_opt_state)


def start_phase(variables: dict, step, config, method, tx, head_tx, *,
                phase: int) -> TrainState:
  """A phase's first state: these backbone variables, fresh heads and optimisers."""
  heads = fresh_heads(config, method, phase=phase, cycle=0)
  return TrainState(
      step=jnp.asarray(step, jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), heads=heads,
      opt_state=tx.init(variables["params"]), head_opt_state=head_tx.init(heads))
