"""Evaluator ``cluster_grid``: random members of a few clusters, one grid each (paper
Fig. 5).

Looking at clusters is the quickest sanity check of a clustering run: are the
largest clusters one visual concept or a dump of everything, and what do the
smallest ones catch? The figure shows the largest cluster, the smallest
(non-empty) one and ``num_random`` others drawn at random, each panel titled
with the cluster id and its size.
"""
from __future__ import annotations

import math
import os

import numpy as np

from deeper_jax.evaluate import context as context_lib


def choose_clusters(cluster_labels, *, num_random: int = 4,
                    seed: int = 0) -> list[tuple[str, int, int]]:
  """[(role, cluster id, size)]: largest, smallest, then random others.

  Ties in size go to the lowest cluster id. Fewer panels when there are
  fewer distinct clusters.
  """
  labels = np.asarray(cluster_labels).reshape(-1)
  if labels.size == 0:
    raise ValueError("cluster_labels is empty; pass one label per image.")
  ids, sizes = np.unique(labels, return_counts=True)
  largest = int(np.argmax(sizes))
  smallest = int(np.argmin(sizes))
  chosen = [("largest", int(ids[largest]), int(sizes[largest]))]
  if smallest != largest:
    chosen.append(("smallest", int(ids[smallest]), int(sizes[smallest])))
  rest = np.setdiff1d(np.arange(len(ids)), [largest, smallest])
  rng = np.random.default_rng(seed)
  picks = rng.choice(rest, size=min(num_random, len(rest)), replace=False)
  chosen += [("random", int(ids[i]), int(sizes[i])) for i in np.sort(picks)]
  return chosen


def tile(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
  """[n, H, W, C] uint8 -> one [rows*(H+pad)-pad, cols*(W+pad)-pad, C] mosaic."""
  n, h, w, c = images.shape
  rows = max(1, math.ceil(n / columns))
  canvas = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), 255,
                   np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    canvas[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = images[i]
  return canvas


def _read(images, indices: np.ndarray) -> np.ndarray:
  """Rows of an array, or of a source (anything with ``.images(indices)``)."""
  if hasattr(images, "images"):
    return np.asarray(images.images(indices))
  return np.asarray(images)[indices]


def save_cluster_grids(images, cluster_labels, path: str, *, num_random: int = 4,
                       per_cluster: int = 16, seed: int = 0) -> list[tuple[str, int, int]]:
  """Writes a PNG with one grid of ``per_cluster`` random members per chosen cluster.

  ``images``: uint8 [N, H, W, C] or a data source (``.images(indices)``), so a
  large dataset is never loaded whole; ``cluster_labels``: [N] ints. Returns
  the (role, cluster id, size) of the panels drawn. Reproducible with ``seed``.
  """
  # A Figure, not pyplot: no global backend switch (notebooks keep inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  labels = np.asarray(cluster_labels).reshape(-1)
  count = len(images)
  if count != labels.size:
    raise ValueError(f"cluster_labels has {labels.size} entries but there are "
                     f"{count} images; pass one label per image.")
  if per_cluster < 1:
    raise ValueError(f"per_cluster must be positive; got {per_cluster}.")
  chosen = choose_clusters(labels, num_random=num_random, seed=seed)
  rng = np.random.default_rng(seed + 1)
  columns = math.ceil(math.sqrt(per_cluster))
  panels = len(chosen)
  panel_cols = min(3, panels)
  panel_rows = math.ceil(panels / panel_cols)
  fig = Figure(figsize=(3.2 * panel_cols, 3.5 * panel_rows), dpi=100)
  axes = fig.subplots(panel_rows, panel_cols, squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (role, cluster, size) in zip(axes.flat, chosen):
    members = np.flatnonzero(labels == cluster)
    pick = np.sort(rng.choice(members, size=min(per_cluster, size), replace=False))
    mosaic = tile(_read(images, pick), columns)
    if mosaic.shape[-1] == 1:
      ax.imshow(mosaic[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
      ax.imshow(mosaic[..., :3])
    ax.set_title(f"{role}: cluster {cluster} (n={size})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  return chosen


def evaluate(ctx: context_lib.Context) -> dict:
  """``<workdir>/eval/clusters.png`` of the final clusters (the ``clusters`` evaluator's,
  or the final network's clustering when that evaluator did not run)."""
  labels = ctx.cache.get("final_labels")
  if labels is None:
    from deeper_jax.cluster import pseudo_labels  # pylint: disable=g-import-not-at-top
    if not pseudo_labels.needs_clustering(ctx.config.method):
      return {"skipped": "this method learns no clusters; run the 'clusters' evaluator first"}
    clusters, _ = context_lib.final_clusters(ctx)
    labels = pseudo_labels.flat_labels(clusters["super_labels"], clusters["sub_labels"],
                                       ctx.config.method.num_sub_clusters)
  path = os.path.join(ctx.out_dir, "clusters.png")
  if not ctx.writes:
    return {"path": path}
  chosen = save_cluster_grids(ctx.datasets.train, labels, path,
                              num_random=ctx.config.eval.grid_num_random,
                              per_cluster=ctx.config.eval.grid_per_cluster, seed=ctx.config.seed)
  return {"path": path, "clusters": [{"role": r, "id": c, "size": n} for r, c, n in chosen]}
