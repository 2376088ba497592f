"""After a reclustering: fresh sub-heads and their optimiser slots; the backbone's kept."""
import jax
import numpy as np
import pytest

from deeper_jax import models
from deeper_jax import parallel
from deeper_jax import state as state_lib
from deeper_jax import train_step as step_lib
from tests.test_train_step import real_batch, tiny_config


def _trained_state(num_super_clusters):
  config = tiny_config(num_super_clusters=num_super_clusters)
  config.train.momentum = 0.9
  num_super = 4 * num_super_clusters
  mesh = parallel.make_mesh(num_super, jax.devices()[:1])
  model = models.build_backbone(config.model)
  tx = step_lib.make_optimizer(config.train)
  state = state_lib.initial_state(model, config, (28, 28, 1), tx, tx, 16)
  shardings = step_lib.state_shardings(state, mesh)
  step = step_lib.make_train_step(model, tx, tx, num_rotations=4, loss="hierarchical",
                                  crop_pad=2, mesh=mesh, state_sharding=shardings)
  state = jax.device_put(state, shardings)
  for i in range(2):
    state, _ = step(state, real_batch(num_super, 4, 3, seed=i), jax.random.key(i))
  return config, tx, jax.device_get(state)


def _momentum(opt_state):
  return opt_state[1][0].trace  # chain(add_decayed_weights, sgd(momentum)) → TraceState


@pytest.mark.parametrize("num_super_clusters", [1, 2])
def test_new_heads_after_reclustering(num_super_clusters):
  config, tx, state = _trained_state(num_super_clusters)
  fresh = jax.device_get(state_lib.new_heads(state, config, 1, tx, 16))
  # Sub-heads: redrawn, momentum zero.
  assert not np.allclose(fresh.heads["W"]["kernel"], state.heads["W"]["kernel"])
  assert np.abs(_momentum(state.head_opt_state)["W"]["kernel"]).max() > 0
  assert np.all(_momentum(fresh.head_opt_state)["W"]["kernel"] == 0)
  # V: kept (with its momentum) only when there is a single super-cluster.
  v_kept = np.array_equal(fresh.heads["V"]["kernel"], state.heads["V"]["kernel"])
  v_momentum_kept = np.array_equal(_momentum(fresh.head_opt_state)["V"]["kernel"],
                                   _momentum(state.head_opt_state)["V"]["kernel"])
  assert v_kept == v_momentum_kept == (num_super_clusters == 1)
  # Backbone and its optimiser state untouched.
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((fresh.params, fresh.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert np.abs(jax.tree.leaves(_momentum(fresh.opt_state))[0]).max() > 0


def test_heads_differ_between_cycles_but_not_between_runs():
  config, tx, state = _trained_state(2)
  a = state_lib.new_heads(state, config, 1, tx, 16).heads["W"]["kernel"]
  b = state_lib.new_heads(state, config, 1, tx, 16).heads["W"]["kernel"]
  c = state_lib.new_heads(state, config, 2, tx, 16).heads["W"]["kernel"]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
