"""The DeeperCluster training loop: cluster, train T epochs, repeat; then evaluate.

One linear loop with clear sections, a pure jitted step, and a checkpoint that holds
the position in the schedule, so that a run killed anywhere and started again with the
same command ends where an uninterrupted run ends:

* every source of randomness is a function of (seed, cycle, epoch, step): the step's
  RNG is the seed's key folded with the step number, the sampling plan of an epoch is
  seeded by (seed, cycle, epoch), the clustering of a cycle by (seed, cycle);
* a checkpoint records (cycle, clustered?, epoch, next step of the epoch's plan); a
  run killed during extraction or k-means redoes that clustering from the last
  checkpoint, which is deterministic and therefore gives the same assignments.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from deeper_jax import checkpointing
from deeper_jax import config_checks
from deeper_jax import cycle_clustering
from deeper_jax import faults
from deeper_jax import final_report
from deeper_jax import models
from deeper_jax import parallel
from deeper_jax import preemption
from deeper_jax import state as state_lib
from deeper_jax import train_step as step_lib
from deeper_jax.data import registry as data_registry
from deeper_jax.data import sampler
from deeper_jax.progress import Progress


def device_batch(source, indices: np.ndarray, sub_labels: np.ndarray,
                 shardings: dict) -> dict:
  """The global batch ``[S, b, ...]`` as sharded arrays, each host reading only its part.

  ``make_array_from_callback`` asks for the shards of this process's devices only, so
  on a multi-host mesh every process decodes just the images its devices train on.
  """
  image_shape = tuple(source.image_shape)

  def images(index):
    rows = indices[index[:2]]
    return source.images(rows.reshape(-1)).reshape(rows.shape + image_shape)

  return {
      "images": jax.make_array_from_callback(indices.shape + image_shape,
                                             shardings["images"], images),
      "sub_labels": jax.make_array_from_callback(
          indices.shape, shardings["sub_labels"], lambda index: sub_labels[indices[index]]),
  }


def _fetch_metrics(pending: list) -> list[dict]:
  return [jax.tree.map(float, m) for m in jax.device_get(pending)]


def _check_finite(records: list[dict], first_step: int, checkpoint_index) -> None:
  for i, record in enumerate(records):
    if not np.isfinite(record["loss"]):
      raise FloatingPointError(
          f"non-finite loss ({record['loss']}) at step {first_step + i}; the last good "
          f"checkpoint ({checkpoint_index}) is intact: lower config.train.learning_rate "
          "and resume from it.")


def train_and_evaluate(config, workdir: str) -> dict:
  """Pre-trains per ``config`` in ``workdir`` (resuming if possible), then evaluates."""
  wall_start = time.time()
  # --- Check everything that can be checked before compute ---------------------
  config_checks.check_static(config, jax.device_count())
  datasets = data_registry.build_datasets(config.data)
  train_source = datasets.train
  config_checks.check_against_data(config, len(train_source))
  checkpointing.check_resumable(workdir, config)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)

  # --- Model, mesh, optimisers, jitted step -----------------------------------
  method, tcfg = config.method, config.train
  num_super = state_lib.num_super_classes(config)
  per_super = tcfg.batch_size // num_super
  mesh = parallel.make_mesh(num_super)
  model = models.build_backbone(config.model)
  image_shape = train_source.image_shape
  feature_dim = config.model.feature_dim
  tx, head_tx = step_lib.make_optimizer(tcfg), step_lib.make_optimizer(tcfg)
  state = state_lib.initial_state(model, config, image_shape, tx, head_tx, feature_dim)
  shardings = step_lib.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  train_step = step_lib.make_train_step(
      model, tx, head_tx, num_rotations=method.num_rotations, loss=method.loss,
      crop_pad=tcfg.crop_pad, mesh=mesh, state_sharding=shardings)
  batch_shardings = step_lib.batch_shardings(mesh)

  # --- Resume ---------------------------------------------------------------
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint.max_to_keep)
  restored = ckpt.restore(checkpointing.abstract_like(state))
  if restored is not None:
    state, clusters, progress = restored
    logging.info("resumed from checkpoint %d at %s", ckpt.latest(), progress)
  else:
    clusters, progress = {}, {"cycle": 0, "clustered": False, "epoch": 0,
                              "step_in_epoch": 0, "history": []}
  base_rng = jax.random.key(config.seed)

  def save() -> int:
    return ckpt.save(state, clusters, progress)

  # --- Cycles: cluster, then train T epochs -----------------------------------
  with preemption.stop_on_signals() as stop:
    while progress["cycle"] < tcfg.num_cycles:
      cycle = progress["cycle"]
      if not progress["clustered"]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        previous = clusters
        clusters, metrics = cycle_clustering.cluster_backbone(
            model, variables, train_source, config, cycle=cycle, mesh=mesh,
            previous=previous)
        if cycle > 0:
          state = state_lib.new_heads(state, config, cycle, head_tx, feature_dim)
          state = jax.device_put(state, shardings)
        progress.update(clustered=True, epoch=0, step_in_epoch=0)
        progress["history"].append({"cycle": cycle, "step": int(state.step), **metrics})
        if metrics:
          writer.write_scalars(int(state.step), {f"clustering/{k}": v
                                                 for k, v in metrics.items()})
        save()
        if stop.requested():
          return {"stopped": stop.signal_name}

      sub_labels = clusters["sub_labels"]
      while progress["epoch"] < tcfg.epochs_per_cycle:
        epoch = progress["epoch"]
        plan = sampler.epoch_plan(
            clusters["super_labels"], sub_labels,
            num_super_clusters=method.num_super_clusters,
            num_rotations=method.num_rotations, batch_per_super=per_super,
            seed=config.seed, cycle=cycle, epoch=epoch)
        bar = Progress(f"cycle {cycle} epoch {epoch}", len(plan))
        pending, first_pending = [], int(state.step)
        for i in range(progress["step_in_epoch"], len(plan)):
          batch = device_batch(train_source, plan[i], sub_labels, batch_shardings)
          step_rng = jax.random.fold_in(base_rng, int(first_pending + len(pending)))
          state, metrics = train_step(state, batch, step_rng)
          pending.append(metrics)
          faults.reached("step", first_pending + len(pending))
          progress["step_in_epoch"] = i + 1
          done_epoch = i + 1 == len(plan)
          global_step = first_pending + len(pending)
          log_now = global_step % tcfg.log_every_steps == 0 or done_epoch
          save_now = (global_step % config.checkpoint.every_steps == 0
                      or stop.requested())
          if log_now or save_now:
            records = _fetch_metrics(pending)
            _check_finite(records, first_pending + 1, ckpt.latest())
            mean = {f"train/{k}": float(np.mean([r[k] for r in records]))
                    for k in records[0]}
            writer.write_scalars(global_step, mean)
            bar.update(i + 1)
            pending, first_pending = [], global_step
          if save_now and not done_epoch:
            save()
            if stop.requested():
              return {"stopped": stop.signal_name}
        progress.update(epoch=epoch + 1, step_in_epoch=0)
        if progress["epoch"] == tcfg.epochs_per_cycle:  # next: the next cycle's clustering
          progress.update(cycle=cycle + 1, clustered=False, epoch=0)
        save()
        if stop.requested():
          return {"stopped": stop.signal_name}
        if not progress["clustered"]:
          break
  writer.flush()
  ckpt.close()

  # --- Evaluate ---------------------------------------------------------------
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  random_variables = state_lib.init_variables(model, config, image_shape)
  results = final_report.evaluate_run(
      model, variables, random_variables, datasets, config, workdir=workdir, mesh=mesh,
      history=progress["history"], wall_start=wall_start)
  writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in results.items()
                                         if isinstance(v, float)})
  writer.flush()
  return results
