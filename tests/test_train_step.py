"""The sharded train step: eq. 5's gradients with per-group sub-head scale, the same
numbers on 1 and 8 devices, W split over the super axis, one compilation, no hidden
host transfers.

``one_step`` is also run in 8-device subprocesses (``from tests.test_train_step import
one_step``), so this module imports nothing from conftest.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from deeper_jax import augment
from deeper_jax import models
from deeper_jax.data import load_fashion_mnist
from deeper_jax.runtime import mesh as mesh_lib
from deeper_jax.train import heads as heads_lib
from deeper_jax.train import losses
from deeper_jax.train import schedule
from deeper_jax.train import state as state_lib
from deeper_jax.train import step as step_lib

STEP_SCRIPT = """
import json
import jax, numpy as np
from tests.test_train_step import one_step
out = one_step({num_rotations}, {num_super_clusters}, {per_super})
np.savez('{path}', **out)
print(json.dumps({{'devices': jax.device_count(), 'mesh': list(out['mesh_shape'].tolist()),
                   'w_spec': str(out['w_spec'])}}))
"""


def step_config(num_rotations=4, num_super_clusters=2, per_super=4, num_sub=3, width=4,
                **fields):
  """configs/tiny.py at a smaller width; plain SGD (lr 1, no momentum, no decay), so that
  a parameter's change in one step is minus its gradient."""
  config = tiny.get_config()
  config.model.width = width
  config.model.feature_dim = 16
  config.method.num_rotations = num_rotations
  config.method.num_super_clusters = num_super_clusters
  config.method.num_sub_clusters = num_sub
  config.train.batch_size = num_rotations * num_super_clusters * per_super
  config.train.learning_rate = 1.0
  config.train.momentum = 0.0
  config.train.weight_decay = 0.0
  for dotted, value in fields.items():
    section, name = dotted.split(".")
    config[section][name] = value
  return config


def build(config, devices=None):
  """(step, placed state, mesh) of ``config`` on ``devices`` (default: all)."""
  model = models.build_backbone(config.model)
  tx = step_lib.make_optimizer(config.train)
  variables = state_lib.init_variables(model, config, channels=1)
  state = state_lib.start_phase(variables, 0, config, config.method, tx, tx, phase=0)
  mesh = mesh_lib.make_mesh(schedule.num_super_classes(config.method), devices)
  shardings = step_lib.state_shardings(state, mesh)
  step = step_lib.make_train_step(model, tx, tx, method=config.method,
                                  train_config=config.train,
                                  image_size=config.data.image_size, mesh=mesh,
                                  state_sharding=shardings)
  return step, jax.device_put(state, shardings), mesh


def real_batch(num_super, per_super, num_sub, seed=0):
  """Real Fashion-MNIST images laid out [S, b, 28, 28, 1] (uint8), random sub labels."""
  images = load_fashion_mnist("train").images(np.arange(num_super * per_super) * 7 + seed)
  rng = np.random.default_rng(seed)
  return {"images": images.reshape((num_super, per_super) + images.shape[1:]),
          "sub_labels": rng.integers(0, num_sub, (num_super, per_super)).astype(np.int32)}


def flat_paths(tree) -> dict:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def one_step(num_rotations, num_super_clusters, per_super, devices=None):
  """One step of the real step function on ``devices``; numpy results."""
  config = step_config(num_rotations, num_super_clusters, per_super)
  num_super = num_rotations * num_super_clusters
  step, state, mesh = build(config, devices)
  before = jax.device_get(state)
  batch = jax.device_put(real_batch(num_super, per_super, 3), step_lib.batch_shardings(mesh))
  state, metrics = step(state, batch, jax.random.key(3))
  # lr 1, no momentum, no decay: the update is minus the gradient.
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), before,
                       jax.device_get(state))
  flat = flat_paths({"params": grads.params, "heads": grads.heads})
  return {**{f"grad:{k}": v for k, v in flat.items()},
          "loss": np.asarray(metrics["loss"]),
          "mesh_shape": np.asarray(mesh.devices.shape),
          "w_spec": np.asarray(str(state.heads["W"]["kernel"].sharding.spec))}


@pytest.mark.parametrize("num_rotations,num_super_clusters,per_super,mesh_shape", [
    (4, 2, 4, (8, 1)),   # 8 super-classes: one per device
    (4, 1, 4, (4, 2)),   # 4 super-classes: groups of 2 devices share one
])
def test_one_and_eight_devices_give_the_same_loss_and_gradients(
    tmp_path, with_devices, num_rotations, num_super_clusters, per_super, mesh_shape):
  single = one_step(num_rotations, num_super_clusters, per_super, jax.devices()[:1])
  path = str(tmp_path / "eight.npz")
  info = with_devices(STEP_SCRIPT.format(num_rotations=num_rotations,
                                         num_super_clusters=num_super_clusters,
                                         per_super=per_super, path=path))
  assert info["devices"] == 8 and tuple(info["mesh"]) == mesh_shape
  assert info["w_spec"] == "P('super',)"  # the sub-heads stay split after the step
  eight = dict(np.load(path))
  np.testing.assert_allclose(eight["loss"], single["loss"], rtol=1e-5)
  grads = [k for k in single if k.startswith("grad:")]
  assert len(grads) > 5 and set(grads) == {k for k in eight if k.startswith("grad:")}
  scale = max(np.abs(single[k]).max() for k in grads)  # largest gradient entry
  for k in grads:
    np.testing.assert_allclose(eight[k], single[k], atol=1e-5 * scale, rtol=1e-4,
                               err_msg=k)
  assert any(np.abs(single[k]).max() > 1e-4 for k in grads if "W" in k)


# --- The sub-heads' gradient scale (method.sub_head_grad) -------------------------------


def slice_grads(features, sub_targets, w, b):
  """∇ of the mean over slice s alone of CE(W_s relu(f) + b_s, z), for every s, directly."""
  def slice_loss(w_s, b_s, f_s, z_s):
    logits = jax.nn.relu(f_s) @ w_s + b_s
    return optax.softmax_cross_entropy_with_integer_labels(logits, z_s).mean()
  grad_w, grad_b = jax.vmap(jax.grad(slice_loss, argnums=(0, 1)))(
      jnp.asarray(w), jnp.asarray(b), jnp.asarray(features), jnp.asarray(sub_targets))
  return np.asarray(grad_w), np.asarray(grad_b)


def test_scaled_sub_head_gradient_is_the_mean_over_its_own_slice():
  num_super, b, dim, k = 8, 6, 12, 5
  rng = np.random.default_rng(0)
  heads = heads_lib.init_heads(jax.random.key(1), dim, num_super, k)
  features = jnp.asarray(rng.normal(size=(num_super, b, dim)), jnp.float32)
  sub = jnp.asarray(rng.integers(0, k, (num_super, b)), jnp.int32)
  grads = jax.grad(lambda h: losses.hierarchical_loss(h, features, sub)[0])(heads)
  scaled = step_lib.scale_sub_head_grads(grads, num_super)
  direct_w, direct_b = slice_grads(features, sub, heads["W"]["kernel"], heads["W"]["bias"])
  assert np.abs(direct_w).max() > 1e-3
  # 'per_group': each W_s gets the mean over its own b images.
  np.testing.assert_allclose(scaled["W"]["kernel"], direct_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(scaled["W"]["bias"], direct_b, rtol=1e-5, atol=1e-7)
  # 'global_mean' (eq. 5 over the whole batch): 1/S of that.
  np.testing.assert_allclose(grads["W"]["kernel"], direct_w / num_super, rtol=1e-5, atol=1e-8)
  # V is a mean over the whole batch either way.
  jax.tree.map(np.testing.assert_array_equal, scaled["V"], grads["V"])
  # The flat loss has no sub-heads: nothing to scale.
  flat = {"U": grads["V"]}
  assert step_lib.scale_sub_head_grads(flat, num_super) is flat


def symmetric_batch(num_super, per_super, num_sub):
  """Real images made left-right symmetric, so that the step's random flip is a no-op."""
  batch = real_batch(num_super, per_super, num_sub, seed=1)
  images = batch["images"]
  return {**batch, "images": np.maximum(images, images[..., ::-1, :])}


def step_features(config, variables, images):
  """The features the step computes for ``images`` when its view is the identity
  (pad crop of 0, symmetric images, no dropout): train-mode BN over the whole batch."""
  model = models.build_backbone(config.model)
  num_super, b = images.shape[:2]
  x = jnp.asarray(images, jnp.float32) / 255.0
  x = augment.rotate_slices(x, config.method.num_rotations)
  (features, _), _ = model.apply(variables, x.reshape((num_super * b,) + x.shape[2:]),
                                 train=True, mutable=["batch_stats"])
  return features.reshape(num_super, b, -1)


@pytest.fixture(scope="module")
def steps_by_sub_head_grad():
  """One deterministic real step from the same state under each sub_head_grad setting."""
  out = {}
  for mode in step_lib.SUB_HEAD_GRADS:
    config = step_config(**{"method.sub_head_grad": mode, "model.dropout": 0.0,
                            "train.crop": "pad", "train.crop_pad": 0,
                            "train.learning_rate": 0.5})
    step, state, mesh = build(config, jax.devices()[:1])
    before = jax.device_get(state)
    batch = symmetric_batch(8, 4, 3)
    after, _ = step(state, jax.device_put(batch, step_lib.batch_shardings(mesh)),
                    jax.random.key(0))
    out[mode] = (config, before, jax.device_get(after), batch)
  return out


def test_one_real_step_moves_each_sub_head_by_its_own_slice_mean(steps_by_sub_head_grad):
  config, before, after, batch = steps_by_sub_head_grad["per_group"]
  variables = {"params": before.params, "batch_stats": before.batch_stats}
  features = step_features(config, variables, batch["images"])
  direct_w, direct_b = slice_grads(features, batch["sub_labels"], before.heads["W"]["kernel"],
                                   before.heads["W"]["bias"])
  lr = config.train.learning_rate
  moved_w = np.asarray(after.heads["W"]["kernel"]) - np.asarray(before.heads["W"]["kernel"])
  moved_b = np.asarray(after.heads["W"]["bias"]) - np.asarray(before.heads["W"]["bias"])
  scale = np.abs(direct_w).max()
  assert scale > 1e-3
  np.testing.assert_allclose(moved_w, -lr * direct_w, rtol=1e-3, atol=1e-4 * lr * scale)
  np.testing.assert_allclose(moved_b, -lr * direct_b, rtol=1e-3, atol=1e-4 * lr * scale)


def test_global_mean_moves_sub_heads_one_over_s_as_far_and_nothing_else_changes(
    steps_by_sub_head_grad):
  _, before, per_group, _ = steps_by_sub_head_grad["per_group"]
  _, before_g, global_mean, _ = steps_by_sub_head_grad["global_mean"]
  jax.tree.map(np.testing.assert_array_equal, before, before_g)  # the same start
  num_super = before.heads["W"]["kernel"].shape[0]
  delta = lambda a, b: np.asarray(a) - np.asarray(b)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
        delta(global_mean.heads["W"][name], before.heads["W"][name]) * num_super,
        delta(per_group.heads["W"][name], before.heads["W"][name]), rtol=1e-4, atol=1e-7)
  # The backbone, its BN statistics and V: the same step in both modes.
  for a, b in zip(jax.tree.leaves((per_group.params, per_group.batch_stats,
                                   per_group.heads["V"])),
                  jax.tree.leaves((global_mean.params, global_mean.batch_stats,
                                   global_mean.heads["V"]))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --- Compilation, transfers, determinism ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_step():
  """(jitted step, the initial state on the host, mesh): each test places its own copy,
  since the step donates its state."""
  step, state, mesh = build(step_config())
  return step, jax.device_get(state), mesh


def place(state, mesh):
  return jax.device_put(state, step_lib.state_shardings(state, mesh))


def test_the_step_compiles_once_across_steps_and_batches(tiny_step):
  step, start, mesh = tiny_step
  state = place(start, mesh)
  for i in range(3):
    batch = jax.device_put(real_batch(8, 4, 3, seed=i), step_lib.batch_shardings(mesh))
    state, metrics = step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 3
  # A fresh run's placed state (the loop's phase start or a resume) reuses it too.
  step(place(start, mesh), batch, jax.random.key(0))
  assert step._cache_size() == 1  # one compilation for every call


def test_the_step_makes_no_host_transfer_when_inputs_are_placed(tiny_step):
  step, start, mesh = tiny_step
  state = place(start, mesh)
  batches = [jax.device_put(real_batch(8, 4, 3, seed=i), step_lib.batch_shardings(mesh))
             for i in range(2)]
  rng = jax.device_put(jax.random.key(0), NamedSharding(mesh, P()))
  with jax.transfer_guard("disallow"):
    for batch in batches:
      state, metrics = step(state, batch, rng)
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))


def test_same_state_batch_and_rng_give_the_same_step(tiny_step):
  """What a resumed run relies on: the step's randomness is (rng, state.step) only."""
  step, start, mesh = tiny_step
  batch = jax.device_put(real_batch(8, 4, 3), step_lib.batch_shardings(mesh))
  results = []
  for rng in (0, 0, 1):
    state, metrics = step(place(start, mesh), batch, jax.random.key(rng))
    results.append(jax.device_get((state.params, metrics["loss"])))
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
  assert float(results[0][1]) != float(results[2][1])  # other crops, flips and dropout
  # The same rng at another step number draws other views: rng is folded with the step.
  moved = place(start.replace(step=start.step + 1), mesh)
  _, later = step(moved, batch, jax.random.key(0))
  assert float(later["loss"]) != float(results[0][1])


def test_each_device_gets_its_own_slice_of_the_global_batch(with_devices):
  """``device_batch`` builds the sharded batch from per-shard reads (multi-host path)."""
  info = with_devices("""
    import json
    import jax, numpy as np
    from deeper_jax.data import load_fashion_mnist
    from deeper_jax.runtime import mesh as mesh_lib
    from deeper_jax.train import step as step_lib
    from deeper_jax.train.loop import device_batch
    source = load_fashion_mnist('test')
    mesh = mesh_lib.make_mesh(4)
    indices = np.arange(4 * 6).reshape(4, 6) * 3
    sub = (np.arange(len(source)) % 7).astype(np.int32)
    batch = device_batch(source, indices, sub, step_lib.batch_shardings(mesh))
    same = (np.array_equal(np.asarray(batch['images']),
                           source.images(indices.reshape(-1)).reshape(4, 6, 28, 28, 1))
            and np.array_equal(np.asarray(batch['sub_labels']), sub[indices]))
    shard = batch['images'].addressable_shards[0]
    print(json.dumps({'same': bool(same), 'shards': len(batch['images'].addressable_shards),
                      'shard_shape': list(shard.data.shape)}))
  """)
  assert info == {"same": True, "shards": 8, "shard_shape": [1, 3, 28, 28, 1]}
