"""``run_evaluation``: every evaluation protocol of DESIGN §4 in one call.

What it runs, in order, and what it writes under ``<workdir>/eval/``:

1. features of a (seeded, random) subset of ``datasets.labelled_train`` and of
   ``datasets.test``: every requested conv block, average-pooled below
   ``max_pool_dim`` (features.py), plus the fc7-like ``features``;
2. a linear probe per layer (linear_probe.py) -> ``probe_by_layer.png``;
3. kNN top-1 on ``knn_layer`` (knn.py);
4. NMI / ARI / purity of ``cluster_labels`` against ``datasets.train.labels``
   (None when either is missing) and ``clusters.png`` (cluster_grid.py);
5. few-label fine-tuning, pretrained vs scratch (finetune.py);
6. ``results.json`` with keys ``linear_probe_by_layer`` (layer -> top-1),
   ``knn_top1``, ``nmi``, ``ari``, ``purity``, ``finetune`` ({'1%': {'pretrained',
   'scratch'}, ...}), plus ``details`` (probe train accuracy, dims, sizes) and
   ``timings`` (seconds per phase). Accuracies are fractions in [0, 1].

``eval_config`` fields (a ConfigDict or dict; every one optional, read with
``.get``; a phase whose switch is off or whose inputs are missing gives None):

  ==========================  ========  ===========================================
  field                       default   meaning
  ==========================  ========  ===========================================
  extract_batch_size          512       images per forward pass (eval mode)
  max_pool_dim                10000     pool each block until h*w*c < this
  probe_layers                'all'     'all' (every block + 'features') or a list
  probe_max_train_images      10000     labelled-train images for probes/kNN; 0 = all
  probe_max_test_images       0         test images for probes/kNN; 0 = all
  probe_epochs                10        0 skips the linear probes
  probe_batch_size            256
  probe_lr                    10.0      peak lr on standardised, 1/sqrt(D)-scaled features
  probe_momentum              0.9
  probe_weight_decay          1e-6
  knn                         True      run the kNN probe
  knn_k                       20
  knn_temperature             0.07      vote weight exp(sim / T)
  knn_weighting               'exp'     'exp' (Wu et al.) or 'majority'
  knn_layer                   'features'
  finetune_fractions          (0.01, 0.1)
  finetune_steps              300       0 skips fine-tuning
  finetune_batch_size         64
  finetune_lr                 0.1
  finetune_momentum           0.9
  finetune_weight_decay       5e-4
  finetune_max_test_images    0         0 = the whole test split
  grid_num_random             4         random clusters shown besides largest/smallest
  grid_per_cluster            16        images per cluster panel
  ==========================  ========  ===========================================

``cluster_labels``: one int per image of ``datasets.train``; for a hierarchical
clustering pass ``super * k_sub + sub``. Reproducible for a given ``seed``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from deeper_jax.evaluate import cluster_metrics
from deeper_jax.evaluate.cluster_grid import save_cluster_grids
from deeper_jax.evaluate.features import ALL_LAYERS, FEATURES, extract_features
from deeper_jax.evaluate.finetune import finetune_few_labels
from deeper_jax.evaluate.knn import knn_accuracy
from deeper_jax.evaluate.linear_probe import linear_probe_by_layer, plot_probe_by_layer

DEFAULTS: dict[str, Any] = {
    "extract_batch_size": 512,
    "max_pool_dim": 10_000,
    "probe_layers": ALL_LAYERS,
    "probe_max_train_images": 10_000,
    "probe_max_test_images": 0,
    "probe_epochs": 10,
    "probe_batch_size": 256,
    "probe_lr": 10.0,
    "probe_momentum": 0.9,
    "probe_weight_decay": 1e-6,
    "knn": True,
    "knn_k": 20,
    "knn_temperature": 0.07,
    "knn_weighting": "exp",
    "knn_layer": FEATURES,
    "finetune_fractions": (0.01, 0.1),
    "finetune_steps": 300,
    "finetune_batch_size": 64,
    "finetune_lr": 0.1,
    "finetune_momentum": 0.9,
    "finetune_weight_decay": 5e-4,
    "finetune_max_test_images": 0,
    "grid_num_random": 4,
    "grid_per_cluster": 16,
}


def read_eval_config(eval_config) -> dict[str, Any]:
  """DEFAULTS overridden by the fields ``eval_config`` sets (None keeps the default)."""
  values = dict(DEFAULTS)
  if eval_config is None:
    return values
  for name in DEFAULTS:
    value = (eval_config.get(name, None) if hasattr(eval_config, "get")
             else getattr(eval_config, name, None))
    if value is not None:
      values[name] = value
  return values


def sample_indices(n: int, max_images: int, seed: int) -> np.ndarray:
  """All of ``range(n)``, or a sorted seeded random subset of ``max_images``."""
  if max_images <= 0 or max_images >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))


def _labelled(source) -> bool:
  return source is not None and getattr(source, "labels", None) is not None


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value)}")


def _as_list(layers) -> list[str]:
  return [layers] if isinstance(layers, str) else list(layers)


def _blocks_to_extract(cfg, want_probes: bool, want_knn: bool):
  """'all', or the list of layers the probes and the kNN read."""
  if want_probes and cfg["probe_layers"] == ALL_LAYERS:
    return ALL_LAYERS
  layers = _as_list(cfg["probe_layers"]) if want_probes else []
  if want_knn and cfg["knn_layer"] not in layers:
    layers.append(cfg["knn_layer"])
  return layers


def _probe_layers(wanted, extracted: list[str]) -> list[str]:
  """Probe order: blocks in backbone order, then 'features' (fc7) last."""
  names = extracted if wanted == ALL_LAYERS else _as_list(wanted)
  return [k for k in extracted if k in names and k != FEATURES] + (
      [FEATURES] if FEATURES in names else [])


def run_evaluation(module, variables, datasets, eval_config=None, *, workdir: str,
                   cluster_labels=None, init_fn: Callable | None = None,
                   seed: int = 0, mesh: Mesh | None = None) -> dict[str, Any]:
  """Runs every protocol and writes ``<workdir>/eval/results.json`` and PNGs.

  ``datasets``: ``.train`` (pre-training set; its labels are read only for
  NMI/ARI/purity), ``.labelled_train`` and ``.test`` sources. ``mesh`` splits
  feature extraction over devices. Returns the dict written to results.json.
  """
  cfg = read_eval_config(eval_config)
  out_dir = os.path.join(workdir, "eval")
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  train_src = getattr(datasets, "train", None)
  labelled = getattr(datasets, "labelled_train", None)
  test = getattr(datasets, "test", None)
  results: dict[str, Any] = {"linear_probe_by_layer": None, "knn_top1": None,
                             "nmi": None, "ari": None, "purity": None,
                             "finetune": None}
  details: dict[str, Any] = {"seed": seed, "config": cfg}
  timings: dict[str, float] = {}
  start_all = time.perf_counter()

  def timed(name, fn):
    start = time.perf_counter()
    value = fn()
    timings[name] = time.perf_counter() - start
    logging.info("eval: %s done in %.1fs", name, timings[name])
    return value

  want_probes = cfg["probe_epochs"] > 0
  want_knn = bool(cfg["knn"])
  if (want_probes or want_knn) and _labelled(labelled) and _labelled(test):
    train_idx = sample_indices(len(labelled), cfg["probe_max_train_images"], seed)
    test_idx = sample_indices(len(test), cfg["probe_max_test_images"], seed + 1)
    layers = _blocks_to_extract(cfg, want_probes, want_knn)
    extract = dict(batch_size=cfg["extract_batch_size"], layers=layers,
                   max_dim=cfg["max_pool_dim"], mesh=mesh)
    train_feats = timed("extract_train", lambda: extract_features(
        module, variables, labelled, indices=train_idx,
        name="features labelled_train", **extract))
    test_feats = timed("extract_test", lambda: extract_features(
        module, variables, test, indices=test_idx, name="features test", **extract))
    train_y = np.asarray(labelled.labels)[train_idx]
    test_y = np.asarray(test.labels)[test_idx]
    details["probe_train_images"] = int(train_idx.size)
    details["probe_test_images"] = int(test_idx.size)
    num_classes = int(max(labelled.num_classes or 0, test.num_classes or 0,
                          train_y.max() + 1, test_y.max() + 1))
    if want_probes:
      probe_layers = _probe_layers(cfg["probe_layers"], list(train_feats))
      probes = timed("linear_probes", lambda: linear_probe_by_layer(
          train_feats, train_y, test_feats, test_y, layers=probe_layers,
          num_classes=num_classes, epochs=cfg["probe_epochs"],
          batch_size=cfg["probe_batch_size"], lr=cfg["probe_lr"],
          momentum=cfg["probe_momentum"], weight_decay=cfg["probe_weight_decay"],
          seed=seed))
      results["linear_probe_by_layer"] = {k: r.test_top1 for k, r in probes.items()}
      details["probe_train_top1"] = {k: r.train_top1 for k, r in probes.items()}
      details["probe_dims"] = {k: r.dim for k, r in probes.items()}
      if writer:
        plot_probe_by_layer(results["linear_probe_by_layer"],
                            os.path.join(out_dir, "probe_by_layer.png"),
                            chance=1.0 / num_classes)
    if want_knn:
      layer = cfg["knn_layer"]
      results["knn_top1"] = timed("knn", lambda: knn_accuracy(
          train_feats[layer], train_y, test_feats[layer], test_y, k=cfg["knn_k"],
          temperature=cfg["knn_temperature"], weighting=cfg["knn_weighting"],
          num_classes=num_classes))
    del train_feats, test_feats
  elif want_probes or want_knn:
    logging.warning("eval: skipping probes and kNN: labelled_train or test has no labels.")

  if cluster_labels is not None and train_src is not None:
    cluster_labels = np.asarray(cluster_labels).reshape(-1)
    if cluster_labels.size != len(train_src):
      raise ValueError(f"cluster_labels has {cluster_labels.size} entries but "
                       f"datasets.train has {len(train_src)} images; pass one per image.")
    if _labelled(train_src):
      truth = np.asarray(train_src.labels)
      results["nmi"] = cluster_metrics.nmi(truth, cluster_labels)
      results["ari"] = cluster_metrics.ari(truth, cluster_labels)
      results["purity"] = cluster_metrics.purity(truth, cluster_labels)
    details["num_clusters"] = int(np.unique(cluster_labels).size)
    if writer:
      details["grid_clusters"] = timed("cluster_grid", lambda: save_cluster_grids(
          train_src, cluster_labels, os.path.join(out_dir, "clusters.png"),
          num_random=cfg["grid_num_random"], per_cluster=cfg["grid_per_cluster"],
          seed=seed))

  if cfg["finetune_steps"] > 0 and _labelled(labelled) and _labelled(test):
    test_idx = sample_indices(len(test), cfg["finetune_max_test_images"], seed + 2)
    results["finetune"] = timed("finetune", lambda: finetune_few_labels(
        module, variables, labelled, test, init_fn=init_fn,
        fractions=tuple(cfg["finetune_fractions"]), steps=cfg["finetune_steps"],
        batch_size=cfg["finetune_batch_size"], lr=cfg["finetune_lr"],
        momentum=cfg["finetune_momentum"],
        weight_decay=cfg["finetune_weight_decay"], seed=seed,
        eval_batch_size=cfg["extract_batch_size"], test_indices=test_idx))

  timings["total"] = time.perf_counter() - start_all
  results["details"] = details
  results["timings"] = timings
  if writer:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, default=_json_default)
  logging.info("eval: %s", {k: results[k] for k in (
      "linear_probe_by_layer", "knn_top1", "nmi", "ari", "purity", "finetune")})
  return results
