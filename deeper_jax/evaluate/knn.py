"""Evaluator ``knn``: k-nearest-neighbour classification on frozen features (cosine).

A probe with no training and no hyper-parameter search, used beside the
linear probe (docs/method.md, "Evaluation protocols"). Rows are L2-normalised so the dot product is the
cosine similarity; each test row takes its ``k`` most similar training rows
and they vote with weight ``exp(sim / temperature)`` (Wu et al. 2018, the
instance-discrimination paper the DeeperCluster paper compares with; T=0.07).
Weighted rather than majority voting because it breaks ties and lets a very
close neighbour outweigh far ones; ``weighting='majority'`` gives plain votes.

The test rows are processed in fixed-size chunks (the last one padded) by one
jitted function, so memory holds ``chunk_size x N_train`` similarities at a
time, never the full test x train matrix.

Many processes: the training bank may be :class:`~deeper_jax.cluster.layout.Rows`
(each process keeps its own rows, docs/scaling.md). Each device then scores a
chunk of queries against its own rows only, keeps its ``k`` best, and the ``S·k``
candidates are all-gathered and merged by one more top-k; in shard order, so ties
still go to the lower training row, as in one ``top_k`` over all rows. The test
rows, fewer, are still gathered to every process.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from deeper_jax.cluster.layout import Rows, shard_index
from deeper_jax.evaluate import context as context_lib
from deeper_jax.extract import features as features_lib
from deeper_jax.runtime import mesh as mesh_lib

WEIGHTINGS = ("exp", "majority")


def _normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _votes(top_sims, top_labels, num_classes: int, weighting: str, temperature: float):
  if weighting == "exp":
    weights = jnp.exp((top_sims - 1.0) / temperature)  # shifted: no overflow
  else:
    weights = jnp.ones_like(top_sims)
  onehot = jax.nn.one_hot(top_labels, num_classes, dtype=weights.dtype)
  return jnp.argmax(jnp.einsum("qk,qkc->qc", weights, onehot), axis=-1)


@functools.lru_cache(maxsize=16)
def _sharded_vote_fn(mesh, num_rows: int, per_shard: int, k: int, num_classes: int,
                     weighting: str, temperature: float):
  """Jitted ``(bank [S*R, D] split, labels [S*R] split, queries [c, D]) -> [c]``."""
  local_k = min(k, per_shard)

  def shard_fn(bank, labels, queries):
    sims = _normalise(queries) @ _normalise(bank).T  # [chunk, R]: this shard's rows only
    rows = shard_index() * per_shard + jnp.arange(per_shard)
    sims = jnp.where(rows[None, :] < num_rows, sims, -jnp.inf)
    top_sims, top_idx = lax.top_k(sims, local_k)
    every_sims = lax.all_gather(top_sims, mesh_lib.DATA_AXES, axis=1, tiled=True)
    every_labels = lax.all_gather(labels[top_idx], mesh_lib.DATA_AXES, axis=1, tiled=True)
    best, at = lax.top_k(every_sims, k)
    return _votes(best, jnp.take_along_axis(every_labels, at, axis=1), num_classes,
                  weighting, temperature)

  return jax.jit(jax.shard_map(shard_fn, mesh=mesh,
                               in_specs=(P(mesh_lib.DATA_AXES), P(mesh_lib.DATA_AXES), P()),
                               out_specs=P(), check_vma=False))


def _knn_predict_rows(bank: Rows, train_y, test_x, *, k, temperature, num_classes,
                      weighting, chunk_size) -> np.ndarray:
  """:func:`knn_predict` with the bank split over the devices of every process."""
  mesh = bank.mesh
  per_shard = bank.array.shape[0] // mesh.size
  padded = np.zeros(bank.array.shape[0], np.int32)
  padded[:bank.num_rows] = train_y
  labels = jax.make_array_from_callback(padded.shape, mesh_lib.rows_sharding(mesh),
                                        lambda index: padded[index])
  vote = _sharded_vote_fn(mesh, bank.num_rows, per_shard, k, num_classes, weighting,
                          float(temperature))
  preds = []
  for start in range(0, test_x.shape[0], chunk_size):
    chunk, count = mesh_lib.pad_rows(test_x[start:start + chunk_size], chunk_size)
    preds.append(np.asarray(vote(bank.array, labels, chunk))[:count])
  return np.concatenate(preds) if preds else np.zeros((0,), np.int32)


def knn_predict(train_x, train_y, test_x, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None,
                weighting: str = "exp", chunk_size: int = 512) -> np.ndarray:
  """Predicted class [N_test] of each test row by a k-NN vote (cosine).

  ``train_x``: numpy [N_train, D], or :class:`Rows` (the bank stays split).
  """
  bank = train_x if isinstance(train_x, Rows) else None
  train_x = (jax.ShapeDtypeStruct(bank.shape, np.float32) if bank is not None
             else np.asarray(train_x, np.float32))
  test_x = np.asarray(test_x, np.float32)
  train_y = np.asarray(train_y).astype(np.int32)
  if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"train and test features must be [N, D] with the same D; "
                     f"got {train_x.shape} and {test_x.shape}.")
  if train_y.shape != (train_x.shape[0],):
    raise ValueError(f"train labels must be [N_train]={train_x.shape[0]}; "
                     f"got shape {train_y.shape}.")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}.")
  if k < 1:
    raise ValueError(f"k must be positive; got {k}.")
  k = min(k, train_x.shape[0])
  if num_classes is None:
    num_classes = int(train_y.max()) + 1
  chunk_size = max(1, min(chunk_size, test_x.shape[0]))
  if bank is not None:
    return _knn_predict_rows(bank, train_y, test_x, k=k, temperature=temperature,
                             num_classes=num_classes, weighting=weighting,
                             chunk_size=chunk_size)

  bank = _normalise(jnp.asarray(train_x))
  bank_labels = jnp.asarray(train_y)

  @jax.jit
  def vote(bank, bank_labels, queries):
    sims = _normalise(queries) @ bank.T  # [chunk, N_train]
    top_sims, top_idx = jax.lax.top_k(sims, k)
    return _votes(top_sims, bank_labels[top_idx], num_classes, weighting, temperature)

  preds = []
  for start in range(0, test_x.shape[0], chunk_size):
    chunk, count = mesh_lib.pad_rows(test_x[start:start + chunk_size], chunk_size)
    preds.append(np.asarray(vote(bank, bank_labels, chunk))[:count])
  return np.concatenate(preds) if preds else np.zeros((0,), np.int32)


def knn_accuracy(train_x, train_y, test_x, test_y, **kwargs) -> float:
  """Top-1 of :func:`knn_predict` against ``test_y`` (fraction in [0, 1])."""
  test_y = np.asarray(test_y)
  if test_y.shape != (np.asarray(test_x).shape[0],):
    raise ValueError(f"test labels must be one per test row; got shape "
                     f"{test_y.shape} for {np.asarray(test_x).shape[0]} rows.")
  preds = knn_predict(train_x, train_y, test_x, **kwargs)
  return float((preds == test_y).mean()) if len(preds) else 0.0


def evaluate(ctx: context_lib.Context) -> dict:
  """Top-1 of the kNN vote on ``eval.knn_layer``, the probe's train/test subsets."""
  cfg, seed = ctx.config.eval, ctx.config.seed
  if not ctx.labelled():
    return {"skipped": context_lib.NEEDS_LABELS}
  data = ctx.datasets
  train_idx = context_lib.sample_indices(len(data.labelled_train), cfg.probe_max_train_images,
                                         seed)
  test_idx = context_lib.sample_indices(len(data.test), cfg.probe_max_test_images, seed + 1)
  layers = "" if cfg.knn_layer == features_lib.FEATURES else cfg.knn_layer
  extract = lambda source, idx, fn=features_lib.extract_features: fn(
      ctx.model, ctx.variables, source, image_size=ctx.config.data.image_size,
      batch_size=cfg.batch_size, layers=layers, indices=idx, max_dim=cfg.max_pool_dim,
      mesh=ctx.mesh, name="knn features", decode=ctx.decode)[cfg.knn_layer]
  # Many processes: the bank stays split over them (one process: numpy, as always).
  bank_fn = (features_lib.extract_rows if jax.process_count() > 1
             else features_lib.extract_features)
  top1 = knn_accuracy(extract(data.labelled_train, train_idx, bank_fn),
                      np.asarray(data.labelled_train.labels)[train_idx],
                      extract(data.test, test_idx), np.asarray(data.test.labels)[test_idx],
                      k=cfg.knn_k, temperature=cfg.knn_temperature,
                      weighting=cfg.knn_weighting, num_classes=context_lib.num_classes(ctx))
  return {"layer": cfg.knn_layer, "k": int(cfg.knn_k), "weighting": cfg.knn_weighting,
          "top1": top1, "train_images": int(train_idx.size), "test_images": int(test_idx.size)}
