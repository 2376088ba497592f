"""The paper's probe protocol (``probe_paper``; the reference eval_linear.py), issue 12.4.

One linear classifier per conv layer on its pre-pool output (which tensors, and their
pooling: test_extract.py), PyTorch's default init, SGD with momentum 0.9, weight decay,
the learning rate ``lr0 / sqrt(1 + lr0·wd·t)``, and random-resized crops + flips as the
training views.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deeper_jax.evaluate import probe_paper
from eval_helpers import fashion_datasets, make_context


@pytest.fixture(autouse=True)
def fresh_train_step():
  """The jitted step is cached per (module, windows, lr, wd); tests that spy on what it
  traces need a new one, and must not leave theirs to the next test."""
  probe_paper._train_step.cache_clear()
  yield
  probe_paper._train_step.cache_clear()


def test_learning_rate_is_lr0_over_sqrt_of_1_plus_lr0_wd_t():
  lr0, wd = 0.02, 1e-5
  schedule = probe_paper.learning_rate(lr0, wd)
  for t in (0, 1, 100, 10_000, 5_000_000):
    assert float(schedule(t)) == pytest.approx(lr0 / np.sqrt(1 + lr0 * wd * t), rel=1e-6)
  assert float(schedule(0)) == pytest.approx(lr0)
  # The decay is slow at the reference's values: after 5M steps lr is lr0 / sqrt(2).
  assert float(schedule(5_000_000)) == pytest.approx(lr0 / np.sqrt(2), rel=1e-6)


def test_optimizer_is_torch_sgd_with_momentum_weight_decay_and_the_decaying_lr(tmp_path):
  """optax's updates equal torch.optim.SGD(momentum=0.9, weight_decay=wd) written out by
  hand, with lr set to lr0 / sqrt(1 + lr0·wd·t) before step t (t from 0)."""
  lr0, wd = 0.1, 0.5  # a large wd, so that both the decay and the schedule show
  ctx = make_context(tmp_path, fashion_datasets(10, 10, 10))
  _, optimizer = probe_paper._train_step(ctx.model, 28, (("conv1_1", 1),), lr0, wd)
  rng = np.random.default_rng(0)
  params = {"conv1_1": {"w": rng.normal(size=(6, 3)).astype(np.float32),
                        "b": rng.normal(size=(3,)).astype(np.float32)}}
  state = optimizer.init(jax.tree.map(jnp.asarray, params))
  torch_params = jax.tree.map(np.float64, params)
  buffers = None
  current = jax.tree.map(jnp.asarray, params)
  for t in range(6):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    updates, state = optimizer.update(jax.tree.map(jnp.asarray, grads), state, current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)
    # torch: d_p = g + wd·p (weights *and* bias); buf = d_p, then 0.9·buf + d_p; p -= lr·buf.
    lr = lr0 / np.sqrt(1 + lr0 * wd * t)
    d_p = jax.tree.map(lambda g, p: g + wd * p, grads, torch_params)
    buffers = d_p if buffers is None else jax.tree.map(lambda b, d: 0.9 * b + d, buffers, d_p)
    torch_params = jax.tree.map(lambda p, b: p - lr * b, torch_params, buffers)
    for ours, theirs in zip(jax.tree.leaves(current), jax.tree.leaves(torch_params)):
      np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)


def test_classifiers_start_from_torch_default_linear_init():
  dims = {"conv1_1": 6272, "conv2_1": 100}
  params = probe_paper.init_classifiers(jax.random.key(0), dims, 10)
  assert list(params) == list(dims)
  for name, dim in dims.items():
    w, b = np.asarray(params[name]["w"]), np.asarray(params[name]["b"])
    assert w.shape == (dim, 10) and b.shape == (10,)
    bound = 1 / np.sqrt(dim)
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weights *and* the bias (nn.Linear).
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.95 * bound
    assert w.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
    assert np.all(b != 0)
  assert not np.allclose(params["conv1_1"]["w"][:100], params["conv2_1"]["w"])


def test_paper_probe_on_fashion_mnist_gives_one_top1_per_conv_layer(tmp_path):
  ctx = make_context(tmp_path, fashion_datasets(1000, 1000, 1000),
                     **{"eval.paper_max_train_images": 1000, "eval.paper_epochs": 2,
                        "eval.paper_max_test_images": 1000})
  result = probe_paper.evaluate(ctx)
  assert result["protocol"] == "paper"
  assert list(result["by_layer"]) == ["conv1_1", "conv2_1", "conv3_1"]
  by_layer = result["by_layer"]
  assert result["best_layer"] == max(by_layer, key=by_layer.get)
  assert result["top1"] == by_layer[result["best_layer"]]
  assert result["last_layer"] == "conv3_1"
  assert result["last_layer_top1"] == by_layer["conv3_1"]
  # Ten classes: chance is 0.1. Two epochs on 1000 images of an untrained network.
  assert all(top1 > 0.25 for top1 in by_layer.values()), by_layer
  assert result["top1"] > 0.35, by_layer
  # At 28 px every conv layer is already below 10k values: window 1, no pooling.
  assert result["windows"] == {"conv1_1": 1, "conv2_1": 1, "conv3_1": 1}
  assert result["dims"] == {"conv1_1": 28 * 28 * 8, "conv2_1": 14 * 14 * 16,
                            "conv3_1": 7 * 7 * 32}
  assert all(np.isfinite(v) for v in result["final_loss"].values())
  assert (result["train_images"], result["test_images"], result["epochs"]) == (1000, 1000, 2)
  image = np.asarray(Image.open(tmp_path / "eval" / "probe_paper_by_layer.png"))
  assert image.std() > 20


def test_paper_probe_trains_on_a_new_random_resized_crop_every_epoch(tmp_path, monkeypatch):
  # 64 labelled images, batch 64: each epoch is one step over the same images, in the
  # same (sorted) order, so the two steps' inputs differ only by their random views.
  ctx = make_context(tmp_path, fashion_datasets(64, 64, 64),
                     **{"eval.paper_batch_size": 64, "eval.paper_epochs": 2,
                        "eval.paper_layers": "conv3_1"})
  seen = []
  real = probe_paper.pooled_layers

  def spy(module, variables, x, windows):
    jax.debug.callback(lambda v: seen.append(np.asarray(v)), x)
    return real(module, variables, x, windows)

  monkeypatch.setattr(probe_paper, "pooled_layers", spy)
  result = probe_paper.evaluate(ctx)
  assert list(result["by_layer"]) == ["conv3_1"]
  assert len(seen) == 2
  first, second = seen
  originals = ctx.datasets.labelled_train.images(np.arange(64)).astype(np.float32) / 255
  assert first.shape == second.shape == originals.shape == (64, 28, 28, 1)
  per_image = lambda a, b: np.abs(a - b).mean(axis=(1, 2, 3))
  # Two epochs see different pixels of the same images ...
  assert np.mean(per_image(first, second) > 0.01) > 0.9
  # ... and neither is the centre view (nor its mirror image): crops, resized.
  for view in (first, second):
    unchanged = np.minimum(per_image(view, originals), per_image(view, originals[:, :, ::-1]))
    assert np.mean(unchanged > 0.01) > 0.9
    assert 0.0 <= view.min() and view.max() <= 1.0 + 1e-6
  # A crop of the image, not noise: the view still correlates with its own image
  # more than with the other images (Fashion-MNIST objects are centred).
  own = np.mean([np.corrcoef(first[i].ravel(), originals[i].ravel())[0, 1] for i in range(64)])
  other = np.mean([np.corrcoef(first[i].ravel(), originals[(i + 1) % 64].ravel())[0, 1]
                   for i in range(64)])
  assert own > other
