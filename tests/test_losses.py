"""The hierarchical loss is paper eq. 5, computed image by image."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeper_jax.train import heads as heads_lib
from deeper_jax.train import losses


def _log_softmax(z):
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def _setup(num_super=8, b=5, dim=12, k=6, loss="hierarchical", seed=0):
  rng = np.random.default_rng(seed)
  heads = heads_lib.init_heads(jax.random.key(seed), dim, num_super, k, loss, "torch")
  heads = jax.tree.map(lambda a: 3.0 * a, heads)  # logits of order 1: a non-trivial softmax
  feats = rng.normal(size=(num_super, b, dim)).astype(np.float32)
  sub = rng.integers(0, k, size=(num_super, b)).astype(np.int32)
  return heads, feats, sub


def test_hierarchical_loss_equals_per_sample_eq5():
  heads, feats, sub = _setup()
  value, metrics = losses.hierarchical_loss(heads, jnp.asarray(feats), jnp.asarray(sub))
  h = jax.tree.map(np.asarray, heads)
  num_super, b, _ = feats.shape
  total, super_total, sub_total = 0.0, 0.0, 0.0
  for s in range(num_super):        # super-class of every image in slice s is s
    for i in range(b):
      f = np.maximum(feats[s, i], 0)
      ce_super = -_log_softmax(f @ h["V"]["kernel"] + h["V"]["bias"])[s]
      ce_sub = -_log_softmax(f @ h["W"]["kernel"][s] + h["W"]["bias"][s])[sub[s, i]]
      super_total += ce_super
      sub_total += ce_sub
      total += ce_super + ce_sub
  n = num_super * b
  np.testing.assert_allclose(float(value), total / n, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["super_loss"]), super_total / n, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["sub_loss"]), sub_total / n, rtol=1e-5)


def test_sub_loss_uses_only_the_head_of_its_super_class():
  heads, feats, sub = _setup()
  base, _ = losses.hierarchical_loss(heads, feats, sub)
  # Changing W_3 changes the loss only through the images of slice 3.
  bump = jax.random.normal(jax.random.key(9), heads["W"]["kernel"].shape[1:])
  heads["W"]["kernel"] = heads["W"]["kernel"].at[3].add(bump)
  changed, _ = losses.hierarchical_loss(heads, feats, sub)
  feats2 = feats.copy()
  feats2[3] = 0.0  # relu(0) = 0: slice 3 no longer reads its head's kernel
  a, _ = losses.hierarchical_loss(heads, feats2, sub)
  heads["W"]["kernel"] = heads["W"]["kernel"].at[3].add(-bump)
  b, _ = losses.hierarchical_loss(heads, feats2, sub)
  assert abs(float(changed) - float(base)) > 1e-3
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_flat_loss_is_one_softmax_over_all_pairs():
  heads, feats, sub = _setup(loss="flat", num_super=4, k=3)
  value, _ = losses.flat_loss(heads, feats, sub)
  u = jax.tree.map(np.asarray, heads)["U"]
  expected = np.mean([-_log_softmax(np.maximum(feats[s, i], 0) @ u["kernel"] + u["bias"])[
      s * 3 + sub[s, i]] for s in range(4) for i in range(feats.shape[1])])
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)


@pytest.mark.parametrize("num_rotations", [1, 4])
def test_rotation_of_a_slice_follows_its_super_class(num_rotations):
  from deeper_jax import augment
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2 * num_rotations, 3, 5, 5, 1)).astype(np.float32)
  out = np.asarray(augment.rotate_slices(jnp.asarray(x), num_rotations))
  for s in range(x.shape[0]):
    np.testing.assert_array_equal(out[s], np.rot90(x[s], k=s % num_rotations, axes=(1, 2)))


def test_with_one_sub_cluster_the_loss_is_rotnets():
  """m = 1, k_sub = 1 (RotNet, the warm-up): the sub-loss is identically zero."""
  heads, feats, _ = _setup(num_super=4, k=1)
  sub = np.zeros(feats.shape[:2], np.int32)
  value, metrics = losses.hierarchical_loss(heads, jnp.asarray(feats), jnp.asarray(sub))
  assert float(metrics["sub_loss"]) == 0.0 and float(metrics["sub_accuracy"]) == 1.0
  assert float(value) == float(metrics["super_loss"]) > 0
  grads = jax.grad(lambda h: losses.hierarchical_loss(h, feats, sub)[0])(heads)
  assert np.all(np.asarray(grads["W"]["kernel"]) == 0)


def test_accuracies_count_correct_argmaxes():
  heads, feats, sub = _setup()
  _, metrics = losses.hierarchical_loss(heads, jnp.asarray(feats), jnp.asarray(sub))
  h = jax.tree.map(np.asarray, heads)
  f = np.maximum(feats, 0)
  super_pred = np.argmax(f @ h["V"]["kernel"] + h["V"]["bias"], -1)
  sub_pred = np.argmax(np.einsum("sbd,sdk->sbk", f, h["W"]["kernel"])
                       + h["W"]["bias"][:, None], -1)
  expected_super = np.mean(super_pred == np.arange(feats.shape[0])[:, None])
  np.testing.assert_allclose(float(metrics["super_accuracy"]), expected_super, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["sub_accuracy"]), np.mean(sub_pred == sub),
                             rtol=1e-6)
