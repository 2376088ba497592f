"""Evaluator ``probe``: the fast linear probe, on every block of the trained network and
of the untrained network of the same seed.

Protocol ``'fast'`` — a quick check, *not* the paper's numbers (that is
``probe_paper``): each stage's output after its max-pool (``conv1`` …) and the fc7
``features``, adaptively average-pooled below ``eval.max_pool_dim`` values,
standardised, a logistic regression trained ``eval.probe_epochs`` epochs on a
labelled subset with no augmentation (evaluate/linear.py), top-1 on the test split.
The headline ``top1`` is the last conv block, as the paper's Table 3 ("the last
convolutional layer").

On many processes the features stay split over the devices (``extract_rows``): no
process gathers the probe's [N, D] blocks (docs/scaling.md).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from deeper_jax.evaluate import context as context_lib
from deeper_jax.evaluate import linear
from deeper_jax.extract import features as features_lib

PROTOCOL = "fast"


def _probe_all(ctx, variables, layers, train_idx, test_idx, seed: int) -> dict:
  cfg, data = ctx.config.eval, ctx.datasets
  # Many processes: each keeps its own rows (Rows) and the probes train on them in
  # place (evaluate/linear.py); one process keeps today's numpy path, bit for bit.
  extract_fn = (features_lib.extract_rows if jax.process_count() > 1
                else features_lib.extract_features)
  extract = lambda source, idx, what: extract_fn(
      ctx.model, variables, source, image_size=ctx.config.data.image_size,
      batch_size=cfg.batch_size, layers=layers, indices=idx, max_dim=cfg.max_pool_dim,
      mesh=ctx.mesh, name=f"probe features ({what})", decode=ctx.decode)
  train_feats = extract(data.labelled_train, train_idx, "labelled train")
  test_feats = extract(data.test, test_idx, "test")
  names = [k for k in train_feats if k != features_lib.FEATURES]
  if features_lib.FEATURES in layers or layers == features_lib.ALL_LAYERS:
    names.append(features_lib.FEATURES)
  return linear.linear_probe_by_layer(
      train_feats, np.asarray(data.labelled_train.labels)[train_idx],
      test_feats, np.asarray(data.test.labels)[test_idx], layers=names,
      num_classes=context_lib.num_classes(ctx), epochs=cfg.probe_epochs,
      batch_size=cfg.probe_batch_size, lr=cfg.probe_lr, momentum=cfg.probe_momentum,
      weight_decay=cfg.probe_weight_decay, seed=seed)


def _headline(by_layer: dict) -> str:
  blocks = [k for k in by_layer if k != features_lib.FEATURES]
  return blocks[-1] if blocks else features_lib.FEATURES


def evaluate(ctx: context_lib.Context) -> dict:
  if not ctx.labelled():
    return {"protocol": PROTOCOL, "skipped": context_lib.NEEDS_LABELS}
  cfg, seed = ctx.config.eval, ctx.config.seed
  layers = cfg.probe_layers
  train_idx = context_lib.sample_indices(len(ctx.datasets.labelled_train),
                                         cfg.probe_max_train_images, seed)
  test_idx = context_lib.sample_indices(len(ctx.datasets.test), cfg.probe_max_test_images,
                                        seed + 1)
  probes = _probe_all(ctx, ctx.variables, layers, train_idx, test_idx, seed)
  by_layer = {k: r.test_top1 for k, r in probes.items()}
  layer = _headline(by_layer)
  result = {"protocol": PROTOCOL, "layer": layer, "top1": by_layer[layer],
            "by_layer": by_layer, "train_top1": {k: r.train_top1 for k, r in probes.items()},
            "dims": {k: r.dim for k, r in probes.items()},
            "train_images": int(train_idx.size), "test_images": int(test_idx.size)}
  if cfg.probe_random_init:
    random = _probe_all(ctx, context_lib.random_init_variables(ctx), layers, train_idx,
                        test_idx, seed)
    result["random_init_by_layer"] = {k: r.test_top1 for k, r in random.items()}
    result["random_init_top1"] = result["random_init_by_layer"][layer]
  if ctx.writes:
    linear.plot_probe_by_layer(by_layer, os.path.join(ctx.out_dir, "probe_by_layer.png"),
                               title="Linear probes, fast protocol",
                               chance=1.0 / context_lib.num_classes(ctx))
  return result
