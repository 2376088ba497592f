"""Evaluator ``finetune``: few-label fine-tuning, pretrained weights vs a random init
(paper Table 2, scaled down).

The question users of self-supervised pre-training care about: with only 1%
or 10% of the labels, does starting from the pretrained backbone beat
starting from scratch? Both runs fine-tune the *whole* backbone plus a new
linear head on ``relu(features)`` (the same input the clustering heads read),
with the same class-balanced labelled subset, the same batches in the same
order, the same optimizer (SGD + momentum, cosine schedule, weight decay) and
the same number of steps; only the initial backbone differs. No augmentation:
the comparison is about the initialisation, and the default budget is small.

The head normalises its input per dimension (BatchNorm without scale and
offset, running statistics at test time; a linear map at inference, as in
MAE's linear probing). Why: the scale of ``features`` differs by orders of
magnitude between a trained backbone and a fresh one whose fc layers start
from the reference N(0, 0.01) init. Without it a fresh width-8 small_cnn28
still predicted a single class after 40 steps (loss 2.30, the plateau of a
tiny-logit start), so a small budget compared a trained network with an
untrained one rather than two initialisations; with it, 30 steps on 1% of
Fashion-MNIST reach ~64% from scratch.

Runs on the default device (no mesh): the subsets are small by design. The
training step is jitted once per (module, hyper-parameters, batch shape) and
reused by every run; the state is donated.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.core import unfreeze

from deeper_jax import augment
from deeper_jax.data import pipeline
from deeper_jax.evaluate import context as context_lib
from deeper_jax.extract.features import layer_shapes, map_batches
from deeper_jax.runtime import logs

HEAD_INIT_STD = 0.01  # the reference heads' N(0, 0.01) init
HEAD_BN_MOMENTUM = 0.9
HEAD_BN_EPS = 1e-5


def fraction_key(fraction: float) -> str:
  """0.01 -> '1%', 0.1 -> '10%', 0.005 -> '0.5%' (the keys of the results)."""
  return f"{100 * fraction:g}%"


def class_balanced_subset(labels, fraction: float, *, seed: int = 0,
                          num_classes: int | None = None) -> np.ndarray:
  """Sorted indices of ``fraction`` of the labelled points, equal count per class.

  ``round(fraction * N / num_classes)`` points per class (at least 1, at most
  the class's size), drawn without replacement; deterministic in ``seed``.
  """
  labels = np.asarray(labels).reshape(-1)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1]; got {fraction}.")
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  per_class = max(1, int(round(fraction * labels.size / num_classes)))
  rng = np.random.default_rng(seed)
  picked = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if members.size:
      picked.append(rng.choice(members, size=min(per_class, members.size),
                               replace=False))
  return np.sort(np.concatenate(picked)) if picked else np.zeros((0,), np.int64)


def default_init_fn(module, image_size: int, channels: int) -> Callable[[jax.Array], Any]:
  """``init_fn(key) -> variables`` of a fresh backbone for ``image_size`` images."""
  @jax.jit  # compiled init is faster than flax's op-by-op eager init
  def init_fn(key):
    dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    return module.init({"params": key, "dropout": key}, dummy, train=False)
  return init_fn


def _split(variables) -> tuple[Any, dict]:
  variables = unfreeze(variables) if hasattr(variables, "unfreeze") else dict(variables)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  return params, state


def make_optimizer(*, steps: int, lr: float, momentum: float,
                   weight_decay: float) -> optax.GradientTransformation:
  """SGD + momentum, cosine-decayed lr, L2 decay on kernels (not biases/BN)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=momentum))


def head_logits(head: dict, features: jax.Array, *, train: bool,
                momentum: float = HEAD_BN_MOMENTUM) -> tuple[jax.Array, dict]:
  """Linear head on ``relu(features)`` normalised without affine (BatchNorm).

  Returns (logits, head with updated running mean/var when ``train``).
  """
  h = jax.nn.relu(features)
  if train:
    mean, var = h.mean(0), h.var(0)
    head = dict(head,
                mean=momentum * head["mean"] + (1 - momentum) * mean,
                var=momentum * head["var"] + (1 - momentum) * var)
  else:
    mean, var = head["mean"], head["var"]
  h = (h - mean) * jax.lax.rsqrt(var + HEAD_BN_EPS)
  return h @ head["w"] + head["b"], head


@functools.lru_cache(maxsize=8)
def _train_step(module, image_size: int, steps: int, lr: float, momentum: float,
                weight_decay: float):
  """Jitted ``(params, state, opt_state, images, labels, key) -> (..., loss)``.

  ``params = {'backbone', 'head': {w, b}}``; ``state = {'backbone': its
  non-param collections, 'head': {mean, var}}``. Cached on the module and the
  hyper-parameters, so the pretrained and the scratch runs of every fraction
  share one compilation.
  """
  optimizer = make_optimizer(steps=steps, lr=lr, momentum=momentum,
                             weight_decay=weight_decay)

  def loss_fn(params, state, images, labels, key):
    x = augment.center_crop(images, image_size).astype(jnp.float32) / 255.0
    collections = state["backbone"]
    variables = {"params": params["backbone"], **collections}
    if collections:
      (features, _), collections = module.apply(
          variables, x, train=True, rngs={"dropout": key}, mutable=list(collections))
    else:
      features, _ = module.apply(variables, x, train=True, rngs={"dropout": key})
    logits, head = head_logits({**params["head"], **state["head"]}, features,
                               train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    new_state = {"backbone": dict(collections),
                 "head": {"mean": head["mean"], "var": head["var"]}}
    return loss, new_state

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, state, opt_state, images, labels, key):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, images, labels, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss
  return step


@functools.lru_cache(maxsize=8)
def _eval_logits(module, image_size: int):
  @jax.jit
  def logits(variables, head, images):
    x = augment.center_crop(images, image_size).astype(jnp.float32) / 255.0
    features, _ = module.apply(variables, x, train=False)
    return head_logits(head, features, train=False)[0]
  return logits


def _batch_plan(indices: np.ndarray, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """``[steps, batch_size]`` indices: sorted batches of seeded permutations, one per pass."""
  rng = np.random.default_rng(seed)
  order, position, plan = rng.permutation(indices), 0, []
  for _ in range(steps):
    if position + batch_size > order.size:
      order, position = rng.permutation(indices), 0
    plan.append(np.sort(order[position:position + batch_size]))
    position += batch_size
  return np.stack(plan)


def train_classifier(module, variables, source, indices, *, image_size: int, steps: int,
                     batch_size: int = 64, lr: float = 0.1, momentum: float = 0.9,
                     weight_decay: float = 5e-4, seed: int = 0,
                     num_classes: int | None = None, name: str = "finetune",
                     decode: pipeline.Decode = pipeline.Decode()) -> tuple[Any, dict]:
  """Supervised training of backbone + a new linear head on ``source[indices]``.

  Returns ``(backbone_variables, head)`` with ``head = {w, b, mean, var}``
  (see :func:`head_logits`). Batches walk through a fresh
  seeded permutation of ``indices`` each pass, so two calls with the same seed
  see the same images in the same order whatever the initial weights. ``decode``:
  how those batches are decoded (data/pipeline.py; default: in this thread).
  """
  indices = np.asarray(indices)
  labels = source.labels
  if labels is None:
    raise ValueError("the fine-tuning source has no labels; pass a labelled split.")
  if indices.size == 0 or steps < 1:
    raise ValueError(f"need a non-empty labelled subset and steps >= 1; got "
                     f"{indices.size} images and steps={steps}.")
  if num_classes is None:
    num_classes = int(source.num_classes or int(np.max(labels)) + 1)
  batch_size = min(batch_size, indices.size)
  params, state = _split(variables)
  key = jax.random.key(seed)
  head_key, key = jax.random.split(key)
  dim = layer_shapes(module, variables, image_size, source.image_shape[-1])[0]
  params = {"backbone": params, "head": {
      "w": HEAD_INIT_STD * jax.random.normal(head_key, (dim, num_classes)),
      "b": jnp.zeros((num_classes,))}}
  state = {"backbone": state,
           "head": {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))}}
  # Copies: the step donates its inputs and the caller keeps its variables.
  params, state = jax.tree.map(jnp.array, (params, state))
  opt_state = make_optimizer(steps=steps, lr=lr, momentum=momentum,
                             weight_decay=weight_decay).init(params)
  step = _train_step(module, image_size, steps, float(lr), float(momentum),
                     float(weight_decay))

  plan = _batch_plan(indices, steps, batch_size, seed)
  report = logs.progress(f"{name}: {steps} steps", steps)
  previous_loss = None
  feed = decode.batches(source, plan[:, None], [(slice(0, 1), slice(0, batch_size))])
  with contextlib.closing(feed):
    for i, (batch, (images,)) in enumerate(zip(plan, feed)):
      params, state, opt_state, loss = step(
          params, state, opt_state, images[0], np.asarray(labels[batch], np.int32),
          jax.random.fold_in(key, i))
      # One step in flight: the next batch is read while this one computes, and
      # the progress line still times real work.
      if previous_loss is not None:
        previous_loss.block_until_ready()
      previous_loss = loss
      report(i + 1)
  logging.info("%s: final batch loss %.4f", name, float(loss))
  return ({"params": params["backbone"], **state["backbone"]},
          {**params["head"], **state["head"]})


def classifier_accuracy(module, variables, head, source, *, image_size: int,
                        batch_size: int = 512, indices: np.ndarray | None = None,
                        decode: pipeline.Decode = pipeline.Decode()) -> float:
  """Top-1 of backbone + head (eval mode) on ``source`` (or ``source[indices]``)."""
  if source.labels is None:
    raise ValueError("the evaluation source has no labels; pass a labelled split.")
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  batch_size = min(batch_size, max(indices.size, 1))
  num_classes = head["b"].shape[0]
  logits = _eval_logits(module, image_size)
  out = map_batches(lambda images: {"logits": logits(variables, head, images)},
                    source, indices, batch_size=batch_size,
                    out_dims={"logits": num_classes}, name="finetune eval", decode=decode)
  pred = out["logits"].argmax(-1)
  return float((pred == np.asarray(source.labels)[indices]).mean())


def finetune_few_labels(module, variables, train_source, test_source, *, image_size: int,
                        init_fn: Callable[[jax.Array], Any] | None = None,
                        fractions: Sequence[float] = (0.01, 0.1), steps: int = 300,
                        batch_size: int = 64, lr: float = 0.1, momentum: float = 0.9,
                        weight_decay: float = 5e-4, seed: int = 0,
                        eval_batch_size: int = 512,
                        test_indices: np.ndarray | None = None,
                        decode: pipeline.Decode = pipeline.Decode()
                        ) -> dict[str, dict[str, float]]:
  """``{'1%': {'pretrained': top1, 'scratch': top1}, '10%': {...}}`` on the test split.

  ``init_fn(key) -> variables`` makes the from-scratch backbone (default: the
  module's own init, seeded by ``seed``). Each fraction uses the same
  class-balanced subset of ``train_source`` for both runs.
  """
  init_fn = init_fn or default_init_fn(module, image_size, train_source.image_shape[-1])
  scratch_variables = init_fn(jax.random.key(seed + 1))
  num_classes = train_source.num_classes or int(np.max(train_source.labels)) + 1
  results: dict[str, dict[str, float]] = {}
  for fraction in fractions:
    subset = class_balanced_subset(train_source.labels, fraction, seed=seed,
                                   num_classes=num_classes)
    label = fraction_key(fraction)
    results[label] = {}
    starts: Mapping[str, Any] = {"pretrained": variables, "scratch": scratch_variables}
    for start_name, start in starts.items():
      trained, head = train_classifier(
          module, start, train_source, subset, image_size=image_size, steps=steps,
          batch_size=batch_size,
          lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed,
          num_classes=num_classes, name=f"finetune {label} {start_name}", decode=decode)
      results[label][start_name] = classifier_accuracy(
          module, trained, head, test_source, image_size=image_size, batch_size=eval_batch_size,
          indices=test_indices, decode=decode)
  return results


def evaluate(ctx: context_lib.Context) -> dict:
  """``{'1%': {'pretrained', 'scratch'}, ...}`` top-1 on the test split."""
  if not ctx.labelled():
    return {"skipped": context_lib.NEEDS_LABELS}
  cfg, seed = ctx.config.eval, ctx.config.seed
  test_idx = context_lib.sample_indices(len(ctx.datasets.test), cfg.finetune_max_test_images,
                                        seed + 2)
  top1 = finetune_few_labels(
      ctx.model, ctx.variables, ctx.datasets.labelled_train, ctx.datasets.test,
      image_size=ctx.config.data.image_size, fractions=tuple(cfg.finetune_fractions),
      steps=cfg.finetune_steps, batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
      momentum=cfg.finetune_momentum, weight_decay=cfg.finetune_weight_decay, seed=seed,
      eval_batch_size=cfg.batch_size, test_indices=test_idx, decode=ctx.decode)
  return {"top1": top1, "steps": int(cfg.finetune_steps), "test_images": int(test_idx.size)}
