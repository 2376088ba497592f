"""The sharded train step: same numbers on 1 and 8 devices, W split, one compilation."""

import jax
import ml_collections
import numpy as np
import pytest

from deeper_jax import parallel
from deeper_jax import state as state_lib
from deeper_jax import train_step as step_lib
from deeper_jax import models

STEP_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, '.')
from tests.test_train_step import one_step
out = one_step({num_rotations}, {num_super_clusters}, {per_super}, width={width})
np.savez('{path}', **out)
print(json.dumps({{'devices': jax.device_count(), 'mesh': list(out['mesh_shape'].tolist()),
                   'w_spec': str(out['w_spec'])}}))
"""


def tiny_config(num_rotations=4, num_super_clusters=2, per_super=4, num_sub=3, width=4):
  config = ml_collections.ConfigDict({
      "seed": 0,
      "model": {"name": "small_cnn28", "sobel": True, "width": width, "feature_dim": 16,
                "dropout": 0.5, "mean": (0.286,), "std": (0.353,)},
      "method": {"num_rotations": num_rotations, "num_super_clusters": num_super_clusters,
                 "num_sub_clusters": num_sub, "loss": "hierarchical"},
      "train": {"batch_size": num_rotations * num_super_clusters * per_super,
                "learning_rate": 1.0, "momentum": 0.0, "weight_decay": 0.0,
                "crop_pad": 2, "init_from": ""},
  })
  return config


def real_batch(num_super, per_super, num_sub, seed=0):
  from deeper_jax.data.fashion_mnist import load_fashion_mnist
  images = load_fashion_mnist("train").images(np.arange(num_super * per_super) * 7)
  rng = np.random.default_rng(seed)
  return {"images": images.reshape((num_super, per_super) + images.shape[1:]),
          "sub_labels": rng.integers(0, num_sub, (num_super, per_super)).astype(np.int32)}


def one_step(num_rotations, num_super_clusters, per_super, devices=None, width=4):
  """One step of the real step function on the given devices; numpy results."""
  config = tiny_config(num_rotations, num_super_clusters, per_super, width=width)
  num_super = num_rotations * num_super_clusters
  mesh = parallel.make_mesh(num_super, devices)
  model = models.build_backbone(config.model)
  tx = step_lib.make_optimizer(config.train)
  state = state_lib.initial_state(model, config, (28, 28, 1), tx, tx, 16)
  shardings = step_lib.state_shardings(state, mesh)
  before = jax.device_get(state)
  state = jax.device_put(state, shardings)
  step = step_lib.make_train_step(model, tx, tx, num_rotations=num_rotations,
                                  loss="hierarchical", crop_pad=2, mesh=mesh,
                                  state_sharding=shardings)
  batch = jax.device_put(real_batch(num_super, per_super, 3),
                         step_lib.batch_shardings(mesh))
  state, metrics = step(state, batch, jax.random.key(3))
  # lr 1, no momentum, no decay: the update is minus the gradient.
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), before,
                       jax.device_get(state))
  flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(
              {"params": grads.params, "heads": grads.heads})}
  return {**{f"grad:{k}": v for k, v in flat.items()},
          "loss": np.asarray(metrics["loss"]),
          "mesh_shape": np.asarray(mesh.devices.shape),
          "w_spec": np.asarray(str(state.heads["W"]["kernel"].sharding.spec))}


@pytest.mark.parametrize("num_rotations,num_super_clusters,per_super,mesh_shape,width", [
    (4, 2, 4, (8, 1), 4),   # 8 super-classes: one per device
    (4, 1, 4, (4, 2), 4),   # 4 super-classes: groups of 2 devices share one
    # width 16: conv2/conv3 take >= 16 channels, so 'auto' runs them on the AMX kernels
    # (custom_partitioning over the batch) where the CPU has AMX.
    (4, 2, 4, (8, 1), 16),
])
def test_one_and_eight_devices_give_the_same_loss_and_gradients(
    tmp_path, with_devices, num_rotations, num_super_clusters, per_super, mesh_shape, width):
  single = one_step(num_rotations, num_super_clusters, per_super, jax.devices()[:1],
                    width=width)
  path = str(tmp_path / "eight.npz")
  info = with_devices(STEP_SCRIPT.format(num_rotations=num_rotations,
                                         num_super_clusters=num_super_clusters,
                                         per_super=per_super, path=path, width=width))
  assert info["devices"] == 8 and tuple(info["mesh"]) == mesh_shape
  assert info["w_spec"] == "P('super',)"
  eight = dict(np.load(path))
  np.testing.assert_allclose(eight["loss"], single["loss"], rtol=1e-5)
  grads = [k for k in single if k.startswith("grad:")]
  assert len(grads) > 5 and set(grads) == {k for k in eight if k.startswith("grad:")}
  scale = max(np.abs(single[k]).max() for k in grads)  # largest gradient entry
  for k in grads:
    np.testing.assert_allclose(eight[k], single[k], atol=1e-5 * scale, rtol=1e-4,
                               err_msg=k)
  assert any(np.abs(single[k]).max() > 1e-4 for k in grads if "W" in k)


def test_sub_heads_stay_split_over_the_super_axis_after_a_step(with_devices):
  info = with_devices("""
    import json, sys
    import jax
    sys.path.insert(0, '.')
    from tests.test_train_step import one_step
    out = one_step(4, 2, 4)
    print(json.dumps({'w_spec': str(out['w_spec'])}))
  """)
  assert info["w_spec"] == "P('super',)"


def test_the_step_compiles_once_across_steps_and_batches():
  config = tiny_config()
  num_super = 8
  mesh = parallel.make_mesh(num_super)
  model = models.build_backbone(config.model)
  tx = step_lib.make_optimizer(config.train)
  state = state_lib.initial_state(model, config, (28, 28, 1), tx, tx, 16)
  shardings = step_lib.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  step = step_lib.make_train_step(model, tx, tx, num_rotations=4, loss="hierarchical",
                                  crop_pad=2, mesh=mesh, state_sharding=shardings)
  for i in range(3):
    batch = real_batch(num_super, 4, 3, seed=i)
    state, metrics = step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 3
  assert step._cache_size() == 1  # one compilation for all three steps


def test_each_device_gets_its_own_slice_of_the_global_batch(with_devices):
  """``device_batch`` builds the sharded batch from per-shard reads (multi-host path)."""
  info = with_devices("""
    import json
    import jax, numpy as np
    from deeper_jax import parallel, train, train_step as step_lib
    from deeper_jax.data.fashion_mnist import load_fashion_mnist
    source = load_fashion_mnist('test')
    mesh = parallel.make_mesh(4)
    indices = np.arange(4 * 6).reshape(4, 6) * 3
    sub = (np.arange(len(source)) % 7).astype(np.int32)
    batch = train.device_batch(source, indices, sub, step_lib.batch_shardings(mesh))
    same = (np.array_equal(np.asarray(batch['images']),
                           source.images(indices.reshape(-1)).reshape(4, 6, 28, 28, 1))
            and np.array_equal(np.asarray(batch['sub_labels']), sub[indices]))
    shard = batch['images'].addressable_shards[0]
    print(json.dumps({'same': bool(same), 'shards': len(batch['images'].addressable_shards),
                      'shard_shape': list(shard.data.shape)}))
  """)
  assert info == {"same": True, "shards": 8, "shard_shape": [1, 3, 28, 28, 1]}
