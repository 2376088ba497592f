"""Backbone weights in and out: export a run, load an export, start a run from another.

An export is a folder with ``variables/`` (an Orbax checkpoint of ``params`` and
``batch_stats``, the Sobel stage folded into the first conv) and ``model.json`` (the
model config that rebuilds the module). ``load_pretrained(path)`` needs nothing else:

  import deeper_jax
  module, variables = deeper_jax.load_pretrained("runs/demo/export")
  features, blocks = module.apply(variables, images, train=False)  # float NHWC in [0, 1]
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from deeper_jax import models
from deeper_jax.errors import ConfigError
from deeper_jax.runtime import checkpoints
from deeper_jax.runtime import mesh as mesh_lib

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
EXPORT_DIR = "export"


def is_export(path: str) -> bool:
  return os.path.exists(os.path.join(path, MODEL_FILE))


def _restore_export(path: str) -> dict:
  raw = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, VARIABLES_DIR)))
  return {"params": raw["params"], "batch_stats": raw.get("batch_stats", {})}


def load_backbone_variables(path: str, like: dict) -> dict:
  """``{'params', 'batch_stats'}`` from a training workdir or an export, checked
  against ``like`` (the variables of the model the caller built)."""
  if is_export(path):
    variables = _restore_export(path)
  else:
    raw = checkpoints.Checkpointer(path).restore_state_tree()
    variables = {"params": raw["params"], "batch_stats": raw.get("batch_stats", {})}
  want = jax.tree.map(lambda x: tuple(x.shape), like)
  got = jax.tree.map(lambda x: tuple(x.shape), variables)
  if want != got:
    raise ConfigError(f"the backbone in {path} does not match config.model (its shapes "
                      "differ); use the model config of the run that wrote it.")
  variables = jax.tree.map(lambda x, y: jax.numpy.asarray(x, y.dtype), variables, like)
  return _replicated(variables) if jax.process_count() == 1 else variables


def _replicated(variables: dict) -> dict:
  """One process: the variables replicated on every device.

  A checkpoint is restored as numpy (whatever devices or processes wrote it); a run
  on as many devices as wrote it used to get them replicated on all of them, and
  the evaluators' programs (and last bits) follow where their inputs live. Many
  processes: left on this process's device, so the probes stay per process.
  """
  sharding = mesh_lib.replicated(mesh_lib.make_mesh())
  return jax.tree.map(lambda x: jax.device_put(x, sharding), variables)


def export(model_config, variables: dict, path: str) -> str:
  """Writes the backbone, Sobel folded into the first conv, for downstream use."""
  if model_config.sobel:
    model_config, variables = models.fold_sobel(model_config, variables)
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(os.path.join(path, VARIABLES_DIR)),
                    {"params": variables["params"],
                     "batch_stats": variables.get("batch_stats", {})}, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, MODEL_FILE), "w") as f:
      f.write(model_config.to_json_best_effort(indent=2))
  return path


def load_pretrained(path: str):
  """``(module, variables)`` of an export: ``module.apply(variables, x, train=False)``
  with ``x`` float NHWC in [0, 1] returns ``(features, blocks)``."""
  if not is_export(path):
    raise FileNotFoundError(f"{path} holds no {MODEL_FILE}: not an export; write one with "
                            "`python -m deeper_jax.main --mode export --workdir <run>`.")
  with open(os.path.join(path, MODEL_FILE)) as f:
    model_config = ml_collections.ConfigDict(json.load(f))
  return models.build_backbone(model_config), _restore_export(path)


def trained_backbone(config, workdir: str, channels: int):
  """``(module, variables)`` from a training workdir's newest checkpoint or an export."""
  if is_export(workdir):
    return load_pretrained(workdir)
  from deeper_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  model = models.build_backbone(config.model)
  like = state_lib.init_variables(model, config, channels)
  return model, load_backbone_variables(workdir, like)


def export_workdir(config, workdir: str, channels: int) -> str:
  model, variables = trained_backbone(config, workdir, channels)
  return export(config.model, variables, os.path.join(workdir, EXPORT_DIR))
