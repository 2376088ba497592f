"""Backbone weights in and out: start a run from another run, export, load an export.

An export is a folder with ``variables/`` (an Orbax checkpoint of ``params`` and
``batch_stats``, Sobel folded into the first conv) and ``model.json`` (the model config
that rebuilds the module). ``load_pretrained(path)`` needs nothing else.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from deeper_jax import models

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


def _restore_raw(path: str) -> dict:
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def _latest_state(workdir: str) -> dict:
  """The raw (untyped) train state of a training workdir's newest checkpoint."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
      directory) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {directory}; point "
                            "config.train.init_from at a training workdir or an export.")
  return _restore_raw(os.path.join(directory, str(max(steps)), "state"))


def load_backbone_variables(path: str, like: dict) -> dict:
  """``{'params', 'batch_stats'}`` from a workdir or an export, checked against ``like``."""
  if os.path.exists(os.path.join(path, MODEL_FILE)):
    raw = _restore_raw(os.path.join(path, VARIABLES_DIR))
  else:
    raw = _latest_state(path)
  variables = {"params": raw["params"], "batch_stats": raw.get("batch_stats", {})}
  want = jax.tree.map(lambda x: tuple(x.shape), like)
  got = jax.tree.map(lambda x: tuple(x.shape), variables)
  if want != got:
    raise ValueError(f"the backbone in {path} does not match config.model (its shapes "
                     "differ); use the model config of the run that wrote it.")
  return jax.tree.map(lambda x, y: jax.numpy.asarray(x, y.dtype), variables, like)


def export(model_config, variables: dict, path: str) -> str:
  """Writes the backbone, Sobel folded into the first conv, for downstream use."""
  if model_config.get("sobel", False):
    model_config, variables = models.fold_sobel(model_config, variables)
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(os.path.join(path, VARIABLES_DIR)),
                    {"params": variables["params"],
                     "batch_stats": variables.get("batch_stats", {})}, force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(path, MODEL_FILE), "w") as f:
    f.write(model_config.to_json_best_effort(indent=2))
  return path


def load_pretrained(path: str):
  """``(module, variables)`` of an export: ``module.apply(variables, x, train=False)``
  with ``x`` float NHWC in [0, 1] returns ``(features, blocks)``."""
  with open(os.path.join(path, MODEL_FILE)) as f:
    model_config = ml_collections.ConfigDict(json.load(f))
  module = models.build_backbone(model_config)
  raw = _restore_raw(os.path.join(path, VARIABLES_DIR))
  return module, {"params": raw["params"], "batch_stats": raw.get("batch_stats", {})}
