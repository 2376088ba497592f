"""The heads: how they are drawn (method.head_init), and how they start over after a
reclustering (fresh sub-heads and optimiser slots; the backbone's state kept)."""
import jax
import numpy as np
import pytest

from deeper_jax.train import heads as heads_lib
from deeper_jax.train import state as state_lib
from deeper_jax.train import step as step_lib
from tests.test_train_step import build, real_batch, step_config

FEATURE_DIM, NUM_SUPER, NUM_SUB = 256, 8, 64


@pytest.fixture(scope="module")
def torch_heads():
  return heads_lib.init_heads(jax.random.key(0), FEATURE_DIM, NUM_SUPER, NUM_SUB,
                              "hierarchical", "torch")


def test_heads_have_one_v_over_super_classes_and_one_w_per_super_class(torch_heads):
  shapes = jax.tree.map(lambda a: a.shape, torch_heads)
  assert shapes == {"V": {"kernel": (FEATURE_DIM, NUM_SUPER), "bias": (NUM_SUPER,)},
                    "W": {"kernel": (NUM_SUPER, FEATURE_DIM, NUM_SUB),
                          "bias": (NUM_SUPER, NUM_SUB)}}
  flat = heads_lib.init_heads(jax.random.key(0), FEATURE_DIM, NUM_SUPER, NUM_SUB, "flat")
  assert jax.tree.map(lambda a: a.shape, flat) == {
      "U": {"kernel": (FEATURE_DIM, NUM_SUPER * NUM_SUB), "bias": (NUM_SUPER * NUM_SUB,)}}


@pytest.mark.parametrize("head,part", [("V", "kernel"), ("V", "bias"), ("W", "kernel"),
                                       ("W", "bias")])
def test_torch_head_init_is_uniform_in_plus_minus_one_over_sqrt_d(torch_heads, head, part):
  """PyTorch's nn.Linear default, weights and bias alike; fan_in = D for every head."""
  value = np.asarray(torch_heads[head][part])
  bound = 1 / np.sqrt(FEATURE_DIM)
  assert np.abs(value).max() <= bound
  assert np.count_nonzero(value) == value.size  # the bias is drawn too, not zero
  if value.size >= 1000:  # V's bias has S values only: too few for statistics
    assert np.abs(value).max() > 0.95 * bound
    np.testing.assert_allclose(value.std(), 1 / np.sqrt(3 * FEATURE_DIM), rtol=0.1)
    assert abs(value.mean()) < 0.1 * bound


def test_normal_head_init_is_n_0_001_with_zero_bias():
  heads = heads_lib.init_heads(jax.random.key(0), FEATURE_DIM, NUM_SUPER, NUM_SUB,
                               "hierarchical", "normal")
  for head in ("V", "W"):
    kernel = np.asarray(heads[head]["kernel"])
    np.testing.assert_allclose(kernel.std(), 0.01, rtol=0.1)
    assert abs(kernel.mean()) < 2e-3
    assert np.all(heads[head]["bias"] == 0)


def test_unknown_head_init_is_refused():
  with pytest.raises(ValueError, match="must be one of"):
    heads_lib.init_heads(jax.random.key(0), 8, 2, 2, "hierarchical", "xavier")


def test_fresh_heads_follow_the_methods_head_init():
  config = step_config(num_sub=NUM_SUB)
  config.model.feature_dim = FEATURE_DIM
  config.method.head_init = "normal"
  normal = state_lib.fresh_heads(config, config.method, phase=0, cycle=0)
  assert np.all(normal["W"]["bias"] == 0)
  config.method.head_init = "torch"
  torch_init = state_lib.fresh_heads(config, config.method, phase=0, cycle=0)
  assert np.abs(np.asarray(torch_init["W"]["bias"])).max() > 0.5 / np.sqrt(FEATURE_DIM)


def _trained_state(num_super_clusters):
  """Two momentum-SGD steps, so that every optimiser slot is non-zero."""
  config = step_config(num_super_clusters=num_super_clusters, **{"train.momentum": 0.9})
  step, state, mesh = build(config, jax.devices()[:1])
  num_super = 4 * num_super_clusters
  for i in range(2):
    batch = jax.device_put(real_batch(num_super, 4, 3, seed=i), step_lib.batch_shardings(mesh))
    state, _ = step(state, batch, jax.random.key(i))
  tx = step_lib.make_optimizer(config.train)
  return config, tx, jax.device_get(state)


@pytest.fixture(scope="module", params=[1, 2])
def trained(request):
  return (request.param,) + _trained_state(request.param)


def _momentum(opt_state):
  return opt_state[1][0].trace  # chain(add_decayed_weights, sgd(momentum)) → TraceState


def test_new_heads_after_reclustering(trained):
  num_super_clusters, config, tx, state = trained
  fresh = jax.device_get(state_lib.new_heads(state, config, config.method, tx, phase=0,
                                             cycle=1))
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
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                  jax.tree.leaves((fresh.params, fresh.batch_stats, fresh.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert np.abs(jax.tree.leaves(_momentum(fresh.opt_state))[0]).max() > 0
  assert int(fresh.step) == int(state.step) == 2


def test_heads_differ_between_cycles_and_phases_but_not_between_runs(trained):
  _, config, tx, state = trained
  draw = lambda phase, cycle: np.asarray(state_lib.new_heads(
      state, config, config.method, tx, phase=phase, cycle=cycle).heads["W"]["kernel"])
  a, b = draw(0, 1), draw(0, 1)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, draw(0, 2))
  assert not np.allclose(a, draw(1, 1))


def test_a_phase_starts_with_the_given_backbone_and_fresh_optimisers(trained):
  """The RotNet → DeeperCluster switch: weights and BN statistics carry over, the rest
  starts over (as a run started from the warm-up's weights)."""
  _, config, tx, state = trained
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  started = state_lib.start_phase(variables, state.step, config, config.method, tx, tx,
                                  phase=1)
  assert int(started.step) == int(state.step)
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((started.params, started.batch_stats))):
    np.testing.assert_array_equal(a, b)
  for slot in jax.tree.leaves((started.opt_state, started.head_opt_state)):
    assert np.all(np.asarray(slot) == 0)
