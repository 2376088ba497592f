"""Evaluators of a pre-trained backbone, looked up by name (paper §5).

``config.eval.evaluators`` (comma-separated) names the evaluators that run at the end
of training and in ``--mode eval`` alike; each takes a :class:`Context` and returns
one JSON-able dict, which becomes the section of that name in
``<workdir>/results.json``:

==============  =============================================================
name            what it measures
==============  =============================================================
probe           fast linear probe on every block + fc7, trained vs untrained
probe_paper     the paper's linear probes on every conv layer (eval_linear.py)
knn             cosine kNN vote (k = 20) on frozen features
clusters        final clusters: sizes, stability; NMI/ARI/purity vs labels
finetune        1% / 10% of the labels: pretrained vs from scratch
cluster_grid    pictures of the largest, smallest and random clusters
==============  =============================================================

``results.json`` holds a ``run`` section written by training (images, steps, wall
time, clustering history, skipped files) and one section per evaluator; ``--mode
eval`` replaces the sections of the evaluators it runs and keeps the others. Every
number also goes to the metric writer (TensorBoard) as ``eval/<section>/<key>``.
An evaluator that cannot run (no labelled images) says why under ``skipped``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

from absl import logging

from deeper_jax.evaluate import cluster_grid, clusters, finetune, knn, probe, probe_paper
from deeper_jax.evaluate.context import Context
from deeper_jax.runtime import workdir as workdir_lib

EVALUATORS: dict[str, Callable[[Context], dict]] = {
    "probe": probe.evaluate,
    "probe_paper": probe_paper.evaluate,
    "knn": knn.evaluate,
    "clusters": clusters.evaluate,
    "finetune": finetune.evaluate,
    "cluster_grid": cluster_grid.evaluate,
}
RESULTS_FILE = "results.json"


def names(spec: str) -> list[str]:
  """``'probe, clusters'`` → ``['probe', 'clusters']`` (checked by config_checks)."""
  return [name.strip() for name in spec.split(",") if name.strip()]


def run(ctx: Context, spec: str) -> dict[str, dict]:
  """Runs the named evaluators in order; each section records its own seconds."""
  results = {}
  for name in names(spec):
    start = time.perf_counter()
    results[name] = EVALUATORS[name](ctx)
    results[name]["seconds"] = time.perf_counter() - start
    logging.info("evaluator %s (%.1f s): %s", name, results[name]["seconds"],
                 {k: v for k, v in results[name].items() if not isinstance(v, (dict, list))})
  return results


def scalars(results: dict, prefix: str = "eval") -> dict[str, float]:
  """Every number of ``results``, flattened to ``'eval/probe/top1'``-style keys."""
  out = {}
  for key, value in results.items():
    name = f"{prefix}/{key}"
    if isinstance(value, dict):
      out.update(scalars(value, name))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[name] = float(value)
  return out


def write(workdir: str, sections: dict) -> dict:
  """Merges ``sections`` into ``<workdir>/results.json`` (atomic); returns the whole."""
  path = os.path.join(workdir, RESULTS_FILE)
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results.update(sections)
  workdir_lib.write_json(path, results)
  return results
