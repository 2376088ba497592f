"""Every config field is checked before any compute, with one sentence naming the field
and the fix.

``check_config`` needs the config and the device count: it checks every field's type
and range (the table returned by ``rules()``), the choices
against the registries, the layer names against the model's structure at the
configured image size, and the batch against the mesh. ``check_against_data`` runs
once the (fast) dataset index is loaded: cluster counts against the number of images,
labels for the evaluators that need them. A config that cannot work costs seconds,
not a cycle.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Any, Callable

import jax

from deeper_jax.errors import ConfigError


def _get(config, path: str):
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Callable:
  def rule(value):
    if not isinstance(value, int) or isinstance(value, bool):
      return "must be an integer"
    if low is not None and value < low:
      return f"must be ≥ {low}"
    if high is not None and value > high:
      return f"must be ≤ {high}"
    return None
  return rule


def real(low: float | None = None, high: float | None = None, *, open_low: bool = False,
         open_high: bool = False) -> Callable:
  def rule(value):
    if not _number(value) or not math.isfinite(value):
      return "must be a finite number"
    if low is not None and (value <= low if open_low else value < low):
      return f"must be {'>' if open_low else '≥'} {low}"
    if high is not None and (value >= high if open_high else value > high):
      return f"must be {'<' if open_high else '≤'} {high}"
    return None
  return rule


def choice(options) -> Callable:
  options = tuple(options)
  return lambda value: None if value in options else f"must be one of {options}"


def boolean(value):
  return None if isinstance(value, bool) else "must be True or False"


def text(value):
  return None if isinstance(value, str) else "must be a string"


def folder(value):
  if not isinstance(value, str):
    return "must be a string (a folder path, or '')"
  return None if not value or os.path.isdir(value) else "is not an existing folder"


def pair(low: float, high: float | None, *, open_low: bool = True) -> Callable:
  """A (lo, hi) range with low < / ≤ lo ≤ hi ≤ high."""
  def rule(value):
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
        _number(v) and math.isfinite(v) for v in value):
      return "must be two finite numbers (lo, hi)"
    lo, hi = value
    if (lo <= low if open_low else lo < low) or lo > hi or (high is not None and hi > high):
      return f"must satisfy {low} {'<' if open_low else '≤'} lo ≤ hi" + (
          f" ≤ {high}" if high is not None else "")
    return None
  return rule


def numbers(positive: bool = False) -> Callable:
  def rule(value):
    if not isinstance(value, (tuple, list)) or not value or not all(
        _number(v) and math.isfinite(v) for v in value):
      return "must be a non-empty tuple of finite numbers"
    if positive and min(value) <= 0:
      return "must hold positive numbers"
    return None
  return rule


def _registries() -> dict[str, tuple]:
  # Local imports: the registries pull in the data, model and evaluator packages.
  from deeper_jax import augment, evaluate, models
  from deeper_jax.cluster import checks as cluster_checks
  from deeper_jax.data import pipeline, registry
  from deeper_jax.evaluate import knn
  from deeper_jax.models import architectures, initializers
  from deeper_jax.train import losses, step
  return {"datasets": tuple(registry.DATASETS), "models": tuple(models.ARCHITECTURES),
          "dtypes": tuple(architectures.DTYPES), "inits": initializers.LINEAR_INITS,
          "losses": tuple(losses.LOSSES), "sub_head_grads": step.SUB_HEAD_GRADS,
          "kmeans_inits": cluster_checks.INITS, "crops": augment.CROPS,
          "evaluators": tuple(evaluate.EVALUATORS), "weightings": knn.WEIGHTINGS,
          "worker_kinds": pipeline.WORKER_KINDS}


def rules() -> dict[str, Callable]:
  """field → rule (a function returning None, or what is wrong with the value)."""
  reg = _registries()
  nonneg, positive = integer(0), integer(1)
  fraction_list = lambda v: (None if isinstance(v, (tuple, list)) and v and all(
      _number(f) and 0 < f <= 1 for f in v) else "must be a non-empty tuple of fractions in (0, 1]")
  return {
      "seed": nonneg,
      "data.name": choice(reg["datasets"]), "data.data_dir": folder,
      "data.image_size": integer(1, 4096), "data.load_size": integer(0, 8192),
      "data.channels": choice((0, 1, 3)), "data.imbalance_ratio": real(1.0, 1e6),
      "data.duplicate_fraction": real(0.0, 1.0, open_high=True),
      "data.clutter_fraction": real(0.0, 1.0, open_high=True), "data.validation_size": nonneg,
      "data.max_train_images": nonneg, "data.max_eval_images": nonneg, "data.seed": nonneg,
      "data.download": boolean, "data.eval_dir": folder, "data.labels_from_subdirs": boolean,
      "data.tfds_name": text, "data.train_split": text, "data.test_split": text,
      "data.workers": integer(0, 256), "data.worker_kind": choice(reg["worker_kinds"]),
      "data.prefetch": integer(1, 1024),
      "model.name": choice(reg["models"]), "model.sobel": boolean,
      "model.folded_sobel": boolean, "model.width": integer(0, 4096),
      "model.feature_dim": integer(0, 1 << 16), "model.dropout": real(0.0, 1.0, open_high=True),
      "model.fc_init": choice(reg["inits"]), "model.dtype": choice(reg["dtypes"]),
      "model.mean": numbers(), "model.std": numbers(positive=True),
      "method.num_rotations": choice((1, 4)), "method.num_super_clusters": integer(1, 1 << 20),
      "method.num_sub_clusters": integer(1, 1 << 24), "method.loss": choice(reg["losses"]),
      "method.targets": choice(("clusters", "labels")),
      "method.head_init": choice(reg["inits"]),
      "method.sub_head_grad": choice(reg["sub_head_grads"]),
      "method.rotnet_warmup_epochs": integer(0, 100_000),
      "clustering.pca_dim": positive, "clustering.pca_sample_size": integer(2),
      "clustering.num_iters": integer(0, 10_000), "clustering.init": choice(reg["kmeans_inits"]),
      "clustering.chunk_size": positive, "clustering.extract_batch_size": positive,
      "clustering.memory_budget_gb": real(0.0, 1e6),
      "train.batch_size": integer(1, 1 << 20), "train.num_cycles": integer(1, 1 << 20),
      "train.epochs_per_cycle": integer(1, 1 << 20),
      "train.learning_rate": real(0.0, 1e3, open_low=True), "train.momentum": real(
          0.0, 1.0, open_high=True), "train.weight_decay": real(0.0, 1.0),
      "train.crop": choice(reg["crops"]), "train.crop_scale": pair(0.0, 1.0),
      "train.crop_ratio": pair(0.0, None), "train.crop_pad": integer(0, 1024),
      "train.log_every_steps": positive, "train.init_from": text, "train.profile": boolean,
      "checkpoint.every_steps": positive, "checkpoint.max_to_keep": positive,
      "eval.evaluators": text, "eval.batch_size": positive, "eval.max_pool_dim": integer(2),
      "eval.probe_layers": text, "eval.probe_random_init": boolean,
      "eval.probe_max_train_images": nonneg, "eval.probe_max_test_images": nonneg,
      "eval.probe_epochs": positive, "eval.probe_batch_size": positive,
      "eval.probe_lr": real(0.0, 1e4, open_low=True),
      "eval.probe_momentum": real(0.0, 1.0, open_high=True),
      "eval.probe_weight_decay": real(0.0, 1.0), "eval.paper_layers": text,
      "eval.paper_epochs": positive, "eval.paper_batch_size": positive,
      "eval.paper_lr": real(0.0, 1e3, open_low=True), "eval.paper_weight_decay": real(0.0, 1.0),
      "eval.paper_max_train_images": nonneg, "eval.paper_max_test_images": nonneg,
      "eval.knn_layer": text, "eval.knn_k": positive,
      "eval.knn_temperature": real(0.0, 1e3, open_low=True),
      "eval.knn_weighting": choice(reg["weightings"]),
      "eval.finetune_fractions": fraction_list, "eval.finetune_steps": positive,
      "eval.finetune_batch_size": positive, "eval.finetune_lr": real(0.0, 1e3, open_low=True),
      "eval.finetune_momentum": real(0.0, 1.0, open_high=True),
      "eval.finetune_weight_decay": real(0.0, 1.0), "eval.finetune_max_test_images": nonneg,
      "eval.clusters_k": positive, "eval.clusters_pixel_baseline": boolean,
      "eval.grid_num_random": nonneg, "eval.grid_per_cluster": positive,
  }


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def leaf_fields(config, prefix: str = "") -> list[str]:
  """Dotted names of every leaf field of ``config``."""
  names = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    names.extend(leaf_fields(value, name + ".") if hasattr(value, "items") else [name])
  return names


def nearest_field(name: str, known: list[str]) -> str:
  """`` (did you mean config.x.y?)`` or ''."""
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  return f" (did you mean config.{close[0]}?)" if close else ""


def check_fields(config) -> None:
  """Every declared field has a value of the right type and range; none is unknown."""
  table = rules()
  fields = leaf_fields(config)
  for name in fields:
    _require(name in table, f"config.{name} is not a field deeper_jax knows"
             f"{nearest_field(name, list(table))}; remove it.")
  for name, rule in table.items():
    _require(name in fields, f"config.{name} is missing; derive configs from "
             "configs/default.py, which declares every field.")
    problem = rule(_get(config, name))
    _require(problem is None, f"config.{name}={_get(config, name)!r} {problem}.")


def check_config(config, num_devices: int) -> None:
  """Checks that need the config and the device count (the model is built, not run)."""
  from deeper_jax import evaluate, models
  from deeper_jax.extract import features as features_lib
  from deeper_jax.runtime import mesh as mesh_lib
  from deeper_jax.train import schedule

  check_fields(config)
  model = models.build_backbone(config.model)
  data, m, method, train = config.data, config.model, config.method, config.train
  _require(not (m.sobel and m.folded_sobel),
           "config.model.sobel and config.model.folded_sobel are exclusive; a folded network "
           "already holds the Sobel stage in conv1_1.")
  _require(not data.load_size or data.load_size >= data.image_size,
           f"config.data.load_size={data.load_size} is smaller than config.data.image_size="
           f"{data.image_size}; crops are taken from load_size images (0 = image_size).")
  for unknown in [n for n in evaluate.names(config.eval.evaluators)
                  if n not in evaluate.EVALUATORS]:
    raise ConfigError(f"config.eval.evaluators names {unknown!r}, not an evaluator"
                      f"{nearest_field(unknown, list(evaluate.EVALUATORS)).replace('config.', '')};"
                      f" use some of {', '.join(evaluate.EVALUATORS)}.")
  _require(method.targets == "clusters" or method.num_super_clusters == 1,
           f"config.method.targets='labels' trains on the classes as one super-cluster: set "
           f"config.method.num_super_clusters=1 (got {method.num_super_clusters}).")
  _require(not config.clustering.memory_budget_gb or config.clustering.init == "random",
           f"config.clustering.memory_budget_gb={config.clustering.memory_budget_gb} streams "
           "spilled features, which k-means++ cannot (a pass over all rows per centroid): set "
           "config.clustering.init='random' or memory_budget_gb=0.")
  _require(not train.init_from or os.path.exists(train.init_from),
           f"config.train.init_from={train.init_from!r} does not exist; point it at a training "
           "workdir or an export, or set it to ''.")
  channels = _channels(config)
  for name, values in (("mean", m.mean), ("std", m.std)):
    _require(len(values) in (1, channels),
             f"config.model.{name} has {len(values)} values but the images have {channels} "
             f"channels; give 1 or {channels}.")

  # The model's structure at this image size.
  try:
    dim, blocks, convs = features_lib.layer_shapes(
        model, _abstract_variables(model, data.image_size, channels), data.image_size, channels)
  except Exception as e:  # pylint: disable=broad-except  # e.g. a block shrinks to nothing
    raise ConfigError(f"config.model.name={m.name!r} cannot run on {data.image_size}-px images "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); raise "
                      "config.data.image_size.") from None
  small = [k for k, shape in blocks.items() if min(shape[:2]) < 1]
  _require(not small, f"config.data.image_size={data.image_size} leaves block {small} empty in "
           f"{m.name}; raise the image size.")
  _require(config.clustering.pca_dim <= dim,
           f"config.clustering.pca_dim={config.clustering.pca_dim} must be ≤ the feature size "
           f"{dim} (config.model.feature_dim).")
  layer_names = [*blocks, features_lib.FEATURES]
  for field, value, available in (
      ("probe_layers", config.eval.probe_layers, layer_names),
      ("paper_layers", config.eval.paper_layers, list(convs)),
      ("knn_layer", config.eval.knn_layer, [*blocks, *convs, features_lib.FEATURES])):
    try:
      features_lib.resolve_layers(value, available)
    except ValueError:
      raise ConfigError(f"config.eval.{field}={value!r} is not a layer of {m.name}; use 'all' "
                        f"or some of {', '.join(available)}.") from None

  # The batch against every phase's super-classes and the mesh.
  for phase in schedule.phases(config):
    num_super = schedule.num_super_classes(phase.method)
    _require(train.batch_size % num_super == 0,
             f"config.train.batch_size={train.batch_size} does not split over the {num_super} "
             f"super-classes of the {phase.name} phase (rotations × super-clusters); use a "
             f"multiple of {num_super}, e.g. {num_super * max(1, round(train.batch_size / num_super))}.")
    _, data_axis = mesh_lib.mesh_shape(num_super, num_devices)
    per_super = train.batch_size // num_super
    _require(per_super % data_axis == 0,
             f"config.train.batch_size={train.batch_size} gives {per_super} images per "
             f"super-class, which does not split over the {data_axis} devices of the data axis; "
             f"use a multiple of {num_super * data_axis}.")


def _channels(config) -> int:
  from deeper_jax.data import registry
  return registry.image_channels(config.data)


def _abstract_variables(model, image_size: int, channels: int) -> Any:
  import jax.numpy as jnp
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)


def check_against_data(config, datasets) -> None:
  """Checks that need the training set's size (known before any compute)."""
  method, n = config.method, len(datasets.train)
  total = method.num_super_clusters * method.num_sub_clusters
  _require(n >= total,
           f"config.method asks for {method.num_super_clusters}×{method.num_sub_clusters}"
           f"={total} clusters but the training set has only {n} images; lower "
           "config.method.num_sub_clusters (or num_super_clusters) or use more data.")
  _require(config.train.batch_size <= n,
           f"config.train.batch_size={config.train.batch_size} is larger than the training set "
           f"({n} images): every step would repeat images; use at most {n}.")
  if method.targets == "labels":
    labels = datasets.train.labels
    _require(labels is not None,
             "config.method.targets='labels' needs a training set with labels; this one has "
             "none (use targets='clusters').")
    _require(int(max(labels)) < method.num_sub_clusters,
             f"config.method.targets='labels': the training set has {int(max(labels)) + 1} "
             f"classes but config.method.num_sub_clusters={method.num_sub_clusters}; set it to "
             f"{int(max(labels)) + 1}.")
  height = datasets.train.image_shape[0]
  _require(height >= config.data.image_size,
           f"the training images are {height} px but config.data.image_size="
           f"{config.data.image_size}; lower it or raise config.data.load_size.")
