"""Evaluator ``probe_paper``: the paper's linear probes (Fig. 2, Tables 3 and 4).

The protocol of the reference ``eval_linear.py`` (and ``linear_classif_layers.sh``),
on every conv layer named in ``eval.paper_layers`` (VGG-16's conv1 … conv13 are
``conv1_1`` … ``conv5_3`` here):

* the frozen backbone in eval mode (BatchNorm running statistics);
* each conv layer's output after its BN-ReLU, *before* max-pooling, average-pooled
  with a fixed window and stride (no padding) to fewer than 10k values (conv13 at
  224 px: 14x14x512 → 4x4x512 = 8192; extract/pooling.py), raw — not standardised;
* one linear layer per conv layer, PyTorch's default init, trained with SGD,
  momentum 0.9, weight decay ``eval.paper_weight_decay`` (1e-5, on weights and bias
  as torch's SGD), batch 256, learning rate ``lr0 / sqrt(1 + lr0·wd·t)`` at
  iteration t (``eval.paper_lr``; the reference tunes it per layer, 0.005 … 0.03,
  0.02 for conv13), for ``eval.paper_epochs`` epochs (reference: 100);
* training images: ``RandomResizedCrop`` + horizontal flip, a new view every epoch;
  test images: the centre view; top-1 on the test split.

All layers are probed in one pass over the data (one forward of the backbone per
batch feeds every classifier; their parameters are independent, so this equals
training them one at a time on the same batches).
"""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deeper_jax import augment
from deeper_jax.evaluate import context as context_lib
from deeper_jax.evaluate import linear
from deeper_jax.extract import features as features_lib
from deeper_jax.extract import pooling
from deeper_jax.models import initializers
from deeper_jax.runtime import logs

PROTOCOL = "paper"


def learning_rate(lr0: float, weight_decay: float):
  """The reference's decay: ``lr0 / sqrt(1 + lr0 * wd * t)``."""
  return lambda t: lr0 / jnp.sqrt(1.0 + lr0 * weight_decay * t)


def init_classifiers(rng: jax.Array, dims: dict[str, int], num_classes: int) -> dict:
  """One ``nn.Linear(d, C)`` per layer, PyTorch's default init."""
  params = {}
  for i, (name, dim) in enumerate(dims.items()):
    kernel_init, bias_init = initializers.linear_init("torch", dim)
    k_w, k_b = jax.random.split(jax.random.fold_in(rng, i))
    params[name] = {"w": kernel_init(k_w, (dim, num_classes)),
                    "b": bias_init(k_b, (num_classes,))}
  return params


def pooled_layers(module, variables, x: jax.Array, windows: dict[str, int]) -> dict:
  """Eval-mode conv-layer activations of float images ``x``, pooled by ``windows``."""
  _, _, convs = features_lib.apply_layers(module, variables, x)
  return {name: pooling.window_pool(convs[name], window) for name, window in windows.items()}


@functools.lru_cache(maxsize=8)
def _train_step(module, image_size: int, windows: tuple, lr0: float, weight_decay: float):
  windows = dict(windows)
  optimizer = optax.chain(optax.add_decayed_weights(weight_decay),
                          optax.sgd(learning_rate(lr0, weight_decay), momentum=0.9))

  def loss_fn(params, feats, labels):
    losses = {name: optax.softmax_cross_entropy_with_integer_labels(
        feats[name] @ p["w"] + p["b"], labels).mean() for name, p in params.items()}
    return sum(losses.values()), losses

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, variables, images_u8, labels, rng):
    x = images_u8.astype(jnp.float32) / 255.0
    k_crop, k_flip = jax.random.split(rng)
    x = augment.random_flip(k_flip, augment.random_resized_crop(k_crop, x, image_size))
    feats = jax.lax.stop_gradient(pooled_layers(module, variables, x, windows))
    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, feats, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses

  return step, optimizer


def _predict(params: dict, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {name: np.asarray(jnp.argmax(jnp.asarray(feats[name]) @ p["w"] + p["b"], -1))
          for name, p in params.items()}


def evaluate(ctx: context_lib.Context) -> dict:
  if not ctx.labelled():
    return {"protocol": PROTOCOL, "skipped": context_lib.NEEDS_LABELS}
  cfg, seed, size = ctx.config.eval, ctx.config.seed, ctx.config.data.image_size
  train_src, test_src = ctx.datasets.labelled_train, ctx.datasets.test
  _, _, conv_shapes = features_lib.layer_shapes(ctx.model, ctx.variables, size, ctx.channels)
  layers = features_lib.resolve_layers(cfg.paper_layers, list(conv_shapes))
  windows = {k: pooling.paper_window(conv_shapes[k], cfg.max_pool_dim) for k in layers}
  dims = {k: features_lib.pooled_size(conv_shapes[k], "paper", cfg.max_pool_dim)[0]
          for k in layers}
  classes = context_lib.num_classes(ctx)
  train_idx = context_lib.sample_indices(len(train_src), cfg.paper_max_train_images, seed)
  test_idx = context_lib.sample_indices(len(test_src), cfg.paper_max_test_images, seed + 1)
  labels = np.asarray(train_src.labels, np.int32)

  step, optimizer = _train_step(ctx.model, size, tuple(windows.items()), float(cfg.paper_lr),
                                float(cfg.paper_weight_decay))
  key = jax.random.key(seed)
  params = jax.tree.map(jnp.array, init_classifiers(jax.random.fold_in(key, 0), dims, classes))
  opt_state = optimizer.init(params)
  batch = min(cfg.paper_batch_size, train_idx.size)
  steps_per_epoch = train_idx.size // batch
  rng = np.random.default_rng(seed)
  report = logs.progress(f"paper probes: {len(layers)} layers, {cfg.paper_epochs} epochs",
                         cfg.paper_epochs * steps_per_epoch)
  losses = {}
  plan = np.stack([np.sort(order[i * batch:(i + 1) * batch])  # [epochs * steps, batch]
                   for order in (rng.permutation(train_idx) for _ in range(cfg.paper_epochs))
                   for i in range(steps_per_epoch)])
  feed = ctx.decode.batches(train_src, plan[:, None], [(slice(0, 1), slice(0, batch))])
  with contextlib.closing(feed):
    for t, (idx, (images,)) in enumerate(zip(plan, feed)):
      params, opt_state, losses = step(params, opt_state, ctx.variables, images[0],
                                       labels[idx], jax.random.fold_in(key, t + 1))
      report(t + 1)
  test_feats = features_lib.extract_features(
      ctx.model, ctx.variables, test_src, image_size=size, batch_size=cfg.batch_size,
      layers=layers, indices=test_idx, pooling_rule="paper", max_dim=cfg.max_pool_dim,
      mesh=ctx.mesh, name="paper probe test features", decode=ctx.decode)
  test_labels = np.asarray(test_src.labels)[test_idx]
  by_layer = {k: float((pred == test_labels).mean())
              for k, pred in _predict(params, test_feats).items()}
  best = max(by_layer, key=by_layer.get)
  if ctx.writes:
    linear.plot_probe_by_layer(by_layer, os.path.join(ctx.out_dir, "probe_paper_by_layer.png"),
                               title="Linear probes, paper protocol", chance=1.0 / classes)
  return {"protocol": PROTOCOL, "by_layer": by_layer, "best_layer": best,
          "top1": by_layer[best], "last_layer": layers[-1], "last_layer_top1": by_layer[layers[-1]],
          "final_loss": {k: float(v) for k, v in losses.items()}, "windows": windows,
          "dims": dims, "epochs": int(cfg.paper_epochs), "lr": float(cfg.paper_lr),
          "train_images": int(train_idx.size), "test_images": int(test_idx.size)}
