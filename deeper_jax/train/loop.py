"""The DeeperCluster training loop: [RotNet warm-up], then cluster and train T epochs,
repeat; then evaluate.

One linear loop with clear sections, a pure jitted step, and a checkpoint that holds
the position in the schedule, so that a run killed anywhere and started again with the
same command ends where an uninterrupted run ends:

* every source of randomness is a function of (seed, phase, cycle, epoch, step): the
  step's RNG is the seed's key folded with the step number inside the step, the
  sampling plan of an epoch is seeded by (seed, phase, cycle, epoch), the clustering of
  a cycle by (seed, cycle);
* a checkpoint records (phase, cycle, clustered?, epoch, next step of the epoch's plan);
  a run killed during extraction or k-means redoes that clustering from the last
  checkpoint, which is deterministic and therefore gives the same assignments.

Many processes (``--distributed``, docs/scaling.md) run this same loop in lockstep:
each reads only its devices' images of every batch and of every extraction, the
clustering comes back to every process as labels, every checkpoint is written by all
of them together, and a stop (preemption) is agreed on by all before that save
(runtime/preemption.py). Only process 0 writes the workdir's other files.
"""
from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
from absl import logging

from deeper_jax import config_checks
from deeper_jax import evaluate
from deeper_jax import export
from deeper_jax import models
from deeper_jax.cluster import pseudo_labels
from deeper_jax.data import fingerprint as fingerprint_lib
from deeper_jax.data import pipeline
from deeper_jax.data import registry as data_registry
from deeper_jax.data import sampler
from deeper_jax.runtime import checkpoints
from deeper_jax.runtime import mesh as mesh_lib
from deeper_jax.runtime import preemption
from deeper_jax.runtime import workdir as workdir_lib
from deeper_jax.train import schedule
from deeper_jax.train import state as state_lib
from deeper_jax.train import step as step_lib


def device_batch(source, indices: np.ndarray, sub_labels: np.ndarray,
                 shardings: dict, local: list[np.ndarray] | None = None) -> dict:
  """The global batch ``[S, b, ...]`` as sharded arrays, each host reading only its part.

  ``make_array_from_callback`` asks for the shards of this process's devices only, so
  on a multi-host mesh every process decodes just the images its devices train on.
  ``local``: those images already decoded by the input pipeline, one array per block
  of ``pipeline.local_blocks(shardings['images'], indices.shape)``; ``None`` reads them here.
  """
  image_shape = tuple(source.image_shape)
  if local is not None:
    blocks = pipeline.local_blocks(shardings["images"], indices.shape)
    if len(blocks) != len(local):
      raise ValueError(f"device_batch got {len(local)} prefetched blocks for the "
                       f"{len(blocks)} blocks of this process's devices.")
    decoded = {pipeline.block_key(block, indices.shape): images
               for block, images in zip(blocks, local)}

  def images(index):
    if local is not None:
      return decoded[pipeline.block_key(index, indices.shape)]
    rows = indices[index[:2]]
    return source.images(rows.reshape(-1)).reshape(rows.shape + image_shape)

  return {
      "images": jax.make_array_from_callback(indices.shape + image_shape,
                                             shardings["images"], images),
      "sub_labels": jax.make_array_from_callback(
          indices.shape, shardings["sub_labels"], lambda index: sub_labels[indices[index]]),
  }


def _check_finite(records: list[dict], first_step: int, checkpoint_index) -> None:
  for i, record in enumerate(records):
    if not np.isfinite(record["loss"]):
      raise FloatingPointError(
          f"non-finite loss ({record['loss']}) at step {first_step + i}; the last good "
          f"checkpoint ({checkpoint_index}) is intact: lower config.train.learning_rate "
          "and resume from it.")


class _Phase:
  """The mesh, shardings and jitted step of one phase (they depend on S = R·m)."""

  def __init__(self, index: int, phase: schedule.Phase, model, config, tx, head_tx):
    self.index, self.phase, self.method = index, phase, phase.method
    self.num_super = schedule.num_super_classes(phase.method)
    self.mesh = mesh_lib.make_mesh(self.num_super)
    self.per_super = config.train.batch_size // self.num_super
    self.config, self.tx, self.head_tx = config, tx, head_tx
    self.model = model

  def template(self, variables: dict) -> state_lib.TrainState:
    """A state of this phase's shapes (for restoring and for starting the phase)."""
    return state_lib.start_phase(variables, 0, self.config, self.method, self.tx,
                                 self.head_tx, phase=self.index)

  def place(self, state: state_lib.TrainState) -> state_lib.TrainState:
    return jax.device_put(state, step_lib.state_shardings(state, self.mesh))

  def train_step(self, state: state_lib.TrainState):
    return step_lib.make_train_step(
        self.model, self.tx, self.head_tx, method=self.method, train_config=self.config.train,
        image_size=self.config.data.image_size, mesh=self.mesh,
        state_sharding=step_lib.state_shardings(state, self.mesh))


def _initial_progress(fingerprint: str) -> dict:
  return {"phase": 0, "cycle": 0, "clustered": False, "epoch": 0, "step_in_epoch": 0,
          "history": [], "data_fingerprint": fingerprint}


def train_and_evaluate(config, workdir: str) -> dict:
  """Pre-trains per ``config`` in ``workdir`` (resuming if possible), then evaluates."""
  wall_start = time.time()
  # --- Check everything that can be checked before any compute -----------------
  config_checks.check_config(config, jax.device_count())
  model = models.build_backbone(config.model)
  with workdir_lib.lock(workdir):
    workdir_lib.check_config(workdir, config)
    datasets = data_registry.build_datasets(config.data)
    train_source = datasets.train
    config_checks.check_against_data(config, datasets)
    item_ids = fingerprint_lib.item_ids(train_source)
    fingerprint = fingerprint_lib.fingerprint(item_ids)
    return _train_and_evaluate(config, workdir, model, datasets, item_ids, fingerprint,
                               wall_start)


def _train_and_evaluate(config, workdir, model, datasets, item_ids, fingerprint, wall_start):
  train_source = datasets.train
  channels = train_source.image_shape[-1]
  tcfg = config.train
  tx, head_tx = step_lib.make_optimizer(tcfg), step_lib.make_optimizer(tcfg)
  phases = [_Phase(i, p, model, config, tx, head_tx)
            for i, p in enumerate(schedule.phases(config))]
  variables = state_lib.init_variables(model, config, channels)
  if tcfg.init_from:
    variables = export.load_backbone_variables(tcfg.init_from, variables)

  # --- Resume ---------------------------------------------------------------
  ckpt = checkpoints.Checkpointer(workdir, config.checkpoint.max_to_keep)
  template = lambda progress: checkpoints.abstract_like(
      phases[progress["phase"]].place(phases[progress["phase"]].template(variables)))
  restored = ckpt.restore(template)
  if restored is not None:
    state, clusters, progress = restored.state, restored.clusters, restored.progress
    workdir_lib.check_data(workdir, fingerprint, item_ids, progress.get("data_fingerprint"))
    workdir_lib.check_cycles(workdir, config, progress, len(phases) - 1)
    logging.info("resumed from checkpoint %d at %s", restored.index,
                 {k: v for k, v in progress.items() if k not in ("history",)})
  else:
    workdir_lib.write_manifest(workdir, item_ids)
    progress = _initial_progress(fingerprint)
    state, clusters = phases[0].place(phases[0].template(variables)), {}
  # clu's writers and hooks import TensorFlow: only once the run is known to go ahead.
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  if jax.process_index() == 0 and restored is None:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  base_rng = jax.random.key(config.seed)

  def save() -> int:
    return ckpt.save(state, clusters, progress)

  # --- Phases: [RotNet warm-up,] cycles of (cluster, train T epochs) ------------
  report = periodic_actions.ReportProgress(
      num_train_steps=_total_steps(phases, len(train_source)), writer=writer, every_secs=30)
  hooks = [report]
  if tcfg.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
  with preemption.stop_on_signals() as stop:
    while True:
      current = phases[progress["phase"]]
      state = current.place(state)
      train_step = current.train_step(state)
      batch_shardings = step_lib.batch_shardings(current.mesh)
      method, per_super = current.method, current.per_super
      while progress["cycle"] < current.phase.num_cycles:
        cycle = progress["cycle"]
        if not progress["clustered"]:
          # 1-5: extract → reduce → cluster → pseudo-labels; new heads.
          previous = clusters
          with report.timed("cluster"):
            clusters, metrics = pseudo_labels.cluster_backbone(
                model, {"params": state.params, "batch_stats": state.batch_stats},
                train_source, _with_method(config, method), cycle=cycle, mesh=current.mesh,
                previous=previous, workdir=workdir)
          if cycle > 0:
            state = current.place(state_lib.new_heads(state, config, method, head_tx,
                                                      phase=current.index, cycle=cycle))
          progress.update(clustered=True, epoch=0, step_in_epoch=0)
          progress["history"].append({"phase": current.phase.name, "cycle": cycle,
                                      "step": int(state.step), **metrics})
          if metrics:  # a real clustering (not RotNet's single cluster): keep it
            writer.write_scalars(int(state.step), {f"clustering/{k}": v
                                                   for k, v in metrics.items()})
            save()
            if stop.requested():
              return _stopped(stop, writer)

        # 6: train T epochs on the pseudo-labels.
        sub_labels = clusters["sub_labels"]
        while progress["epoch"] < current.phase.epochs_per_cycle:
          epoch = progress["epoch"]
          plan = sampler.epoch_plan(
              clusters["super_labels"], sub_labels,
              num_super_clusters=method.num_super_clusters,
              num_rotations=method.num_rotations, batch_per_super=per_super,
              seed=config.seed, phase=current.index, cycle=cycle, epoch=epoch)
          logging.info("%s cycle %d epoch %d: %d steps", current.phase.name, cycle, epoch,
                       len(plan))
          pending, first_pending = [], int(state.step)
          first = progress["step_in_epoch"]
          feed = pipeline.Decode.from_config(config).batches(
              train_source, plan, pipeline.local_blocks(batch_shardings["images"],
                                                        plan.shape[1:]), start=first)
          with contextlib.closing(feed):
            for i, local in zip(range(first, len(plan)), feed):
              batch = device_batch(train_source, plan[i], sub_labels, batch_shardings, local)
              state, metrics = train_step(state, batch, base_rng)
              pending.append(metrics)
              progress["step_in_epoch"] = i + 1
              done_epoch = i + 1 == len(plan)
              global_step = first_pending + len(pending)
              for hook in hooks:
                hook(global_step)
              stopping = stop.at_step(global_step)  # every process, every step
              log_now = global_step % tcfg.log_every_steps == 0 or done_epoch
              save_now = global_step % config.checkpoint.every_steps == 0 or stopping
              if log_now or save_now:
                records = [jax.tree.map(float, m) for m in jax.device_get(pending)]
                _check_finite(records, first_pending + 1, ckpt.latest())
                mean = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
                count, total = progress.get("epoch_loss_sum", (0, 0.0))  # survives a resume
                progress["epoch_loss_sum"] = (count + len(records),
                                              total + sum(r["loss"] for r in records))
                writer.write_scalars(global_step, {f"train/{k}": v for k, v in mean.items()})
                pending, first_pending = [], global_step
              if save_now and not done_epoch:
                save()
                if stop.requested():
                  return _stopped(stop, writer)
          count, total = progress.pop("epoch_loss_sum", (0, 0.0))
          if count:
            progress["history"][-1].setdefault("epoch_loss", []).append(total / count)
          progress.update(epoch=epoch + 1, step_in_epoch=0)
          cycle_done = progress["epoch"] == current.phase.epochs_per_cycle
          if cycle_done:  # next: a new clustering
            progress.update(cycle=cycle + 1, clustered=False, epoch=0)
          save()
          if stop.requested():
            return _stopped(stop, writer)
          if cycle_done:
            break
      if current.index == len(phases) - 1:
        break
      # Phase switch: the backbone carries over; heads and optimisers start fresh.
      progress.update(phase=current.index + 1, cycle=0, clustered=False, epoch=0,
                      step_in_epoch=0)
      following = phases[current.index + 1]
      state = following.place(state_lib.start_phase(
          {"params": state.params, "batch_stats": state.batch_stats}, state.step, config,
          following.method, tx, head_tx, phase=following.index))
      clusters = {}  # no save: the switch is redone, identically, from the last checkpoint
  writer.flush()
  ckpt.close()

  # --- Evaluate ---------------------------------------------------------------
  last = phases[-1]
  ctx = evaluate.Context(
      model=model, variables=_host_copy({"params": state.params,
                                         "batch_stats": state.batch_stats}),
      config=config, datasets=datasets, mesh=last.mesh, workdir=workdir,
      last_clusters=clusters or None)
  sections = evaluate.run(ctx, config.eval.evaluators)
  run_info = {
      "train_images": len(train_source), "steps": int(state.step),
      "wall_seconds": time.time() - wall_start, "cycles": progress["history"],
      "data_fingerprint": fingerprint, **data_report(train_source)}
  results = evaluate.write(workdir, {"run": run_info, **sections})
  writer.write_scalars(int(state.step), evaluate.scalars(sections))
  writer.flush()
  logging.info("results: %s", {name: {k: v for k, v in section.items() if k in (
      "top1", "random_init_top1", "nmi_labels", "skipped")} for name, section in sections.items()})
  return results


def data_report(source) -> dict:
  """Files skipped as unreadable (image folders): count and the first few with reasons."""
  skipped = getattr(source, "skipped", None)
  base = getattr(source, "_base", None)
  if skipped is None and base is not None:
    skipped = getattr(base, "skipped", None)
  if skipped is None:
    return {}
  return {"skipped_files": len(skipped),
          "skipped_examples": [f"{path}: {reason}" for path, reason in skipped[:20]]}


def _stopped(stop, writer) -> dict:
  """What a run stopped by a signal returns, its metrics written out first."""
  writer.flush()
  return {"stopped": stop.signal_name}


def _host_copy(variables: dict) -> dict:
  """Many processes: the backbone's variables as numpy on this process.

  Evaluators train their probes on each process's own devices, and place the
  variables on the mesh themselves where they extract features over all of them;
  arrays that span other processes' devices would turn every probe step into a
  job-wide computation. One process: left as they are, so that the probes' programs
  (and their last bits) are those of a run before multi-process support.
  """
  if jax.process_count() == 1:
    return variables
  return jax.device_get(variables)


def _with_method(config, method):
  """``config`` as seen by one phase: its own method settings."""
  if method is config.method:
    return config
  view = config.copy_and_resolve_references()
  with view.unlocked():
    view.method = method
  return view


def _total_steps(phases: list[_Phase], num_images: int) -> int:
  return sum(p.phase.num_cycles * p.phase.epochs_per_cycle * sampler.steps_per_epoch(
      num_images, num_super_clusters=p.method.num_super_clusters,
      num_rotations=p.method.num_rotations, batch_per_super=p.per_super) for p in phases)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flat(value, name + "."))
    else:
      out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return out


def evaluate_workdir(config, workdir: str) -> dict:
  """``--mode eval``: the evaluators on a workdir's newest checkpoint (or an export)."""
  config_checks.check_config(config, jax.device_count())
  datasets = data_registry.build_datasets(config.data)
  config_checks.check_against_data(config, datasets)
  model, variables = export.trained_backbone(config, workdir, datasets.train.image_shape[-1])
  variables = _host_copy(variables)
  last_clusters = None
  if not export.is_export(workdir):
    last_clusters = checkpoints.Checkpointer(workdir).restore_clusters() or None
  mesh = mesh_lib.make_mesh(schedule.num_super_classes(config.method))
  ctx = evaluate.Context(model=model, variables=variables, config=config, datasets=datasets,
                         mesh=mesh, workdir=workdir, last_clusters=last_clusters)
  sections = evaluate.run(ctx, config.eval.evaluators)
  return evaluate.write(workdir, sections)


def export_workdir(config, workdir: str) -> str:
  """``--mode export``: the newest checkpoint's backbone, Sobel folded, to <workdir>/export."""
  config_checks.check_config(config, jax.device_count())
  return export.export_workdir(config, workdir, data_registry.image_channels(config.data))
