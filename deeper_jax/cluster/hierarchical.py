"""Two-level k-means (DeeperCluster §4.1): m super-clusters, then k_sub inside each.

Level 1 clusters all N points into ``num_super`` super-clusters. Level 2 runs an
independent k-means into ``num_sub`` clusters on the points of each super-cluster;
sub labels are *local* ids in ``[0, num_sub)``, so super-class ``c`` owns head
``W_c`` with ``num_sub`` outputs. A super-cluster with fewer than ``num_sub`` points
``n_c`` gets ``n_c`` clusters (its remaining sizes are 0); an empty one gets none.

Compilation: the super-cluster sizes change every cycle, and a new row count would
mean new XLA programs for every super-cluster every cycle. Each subset is therefore
copied into a zero-padded buffer of a *bucketed* size (the next ``m * 2**e`` with
``8 <= m < 16``: at most 12.5% padding) and clustered with ``num_valid=n_c``, so
the same few compiled shapes serve all super-clusters and cycles. (The subset is a
copy anyway, so the padding costs no extra copy.)

Why a loop over super-clusters and not a vmap: the super-clusters have different
sizes, so a batched k-means would pad every one to the largest (up to m times the
work and memory); the loop runs each on the *whole* mesh, so every level-2 k-means
is as parallel as level 1 and the total work is the same as one flat pass. At the
paper's scale (64 GPUs, m=4) each super-cluster would instead run on its own group
of devices (the ``super`` mesh axis) concurrently; with one host and a handful of
devices the loop is the simpler equivalent.

Many processes: ``x`` stays split over the devices of every process
(:class:`~deeper_jax.cluster.layout.Rows`); a super-cluster's points are moved
into their own bucketed matrix by :func:`~deeper_jax.cluster.layout.gather_rows`
(device to device, bits unchanged), and every process receives the labels.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from absl import logging
from jax.sharding import Mesh

from deeper_jax.cluster import checks, spill
from deeper_jax.cluster.kmeans import kmeans
from deeper_jax.cluster.layout import as_rows, gather_rows


class HierarchicalResult(NamedTuple):
  super_labels: np.ndarray  # [N] int32 in [0, m)
  sub_labels: np.ndarray    # [N] int32 in [0, k_sub), local to the super-cluster
  super_objective: float    # level-1 sum of squared distances
  sub_objective: float      # level-2 sum over super-clusters
  super_sizes: np.ndarray   # [m] int32
  sub_sizes: np.ndarray     # [m, k_sub] int32 (zeros past a small super-cluster's n_c)


def bucket_rows(n: int) -> int:
  """Smallest ``m * 2**e >= n`` with ``8 <= m < 16`` (``n`` itself below 16)."""
  if n < 16:
    return n
  step = 1 << (n.bit_length() - 4)
  return -(-n // step) * step


def _sub_seed(seed: int, super_id: int) -> int:
  """Independent, reproducible seed for the k-means inside one super-cluster."""
  return int(np.random.SeedSequence([seed, super_id]).generate_state(1)[0] % (2**31 - 1))


def hierarchical_kmeans(x, num_super: int, num_sub: int, *, num_iters: int = 10, seed: int = 0,
                        chunk_size: int = 8192, mesh: Mesh | None = None,
                        init: str = "random",
                        progress: Callable[[int, float], None] | None = None
                        ) -> HierarchicalResult:
  """Super-clusters over all rows of ``x`` [N, d], then sub-clusters inside each.

  ``x``: a numpy or jax matrix, or :class:`Rows` (then ``mesh`` is theirs), or
  :class:`~deeper_jax.cluster.spill.Spilled` rows (each super-cluster a selection of
  the same files, streamed).

  ``progress(iteration, objective)`` is called after every Lloyd iteration of every
  k-means run (level 1, then each super-cluster in turn).
  """
  n, _ = checks.check_features(x, "x")
  checks.check_num_clusters(num_super, n, "num_super")
  checks.check_positive(num_sub, "num_sub")
  checks.check_init(init)
  spilled = isinstance(x, spill.Spilled)
  rows_x = x if spilled else as_rows(x, mesh)

  # One super-cluster: its centroid is the mean, one iteration finds it.
  top = kmeans(rows_x, num_super, num_iters=num_iters if num_super > 1 else min(num_iters, 1),
               seed=seed, init=init, chunk_size=chunk_size, mesh=mesh, progress=progress)
  super_labels = top.assignments.astype(np.int32)
  sub_labels = np.zeros(n, np.int32)
  sub_sizes = np.zeros((num_super, num_sub), np.int32)
  sub_objective = 0.0
  for c in range(num_super):
    rows = np.flatnonzero(super_labels == c)
    k_c = min(num_sub, len(rows))
    if k_c == 0:
      continue
    if num_super == 1:  # DeepCluster's flat k-means: the same call as kmeans(x, k_sub, seed)
      part = kmeans(rows_x, k_c, num_iters=num_iters, seed=seed, init=init,
                    chunk_size=chunk_size, progress=progress)
    else:
      subset = (rows_x.select(rows, bucket_rows(len(rows))) if spilled
                else gather_rows(rows_x, rows, bucket_rows(len(rows))))
      part = kmeans(subset, k_c, num_iters=num_iters, seed=_sub_seed(seed, c), init=init,
                    chunk_size=chunk_size, mesh=mesh, progress=progress, num_valid=len(rows))
    sub_labels[rows] = part.assignments
    sub_sizes[c, :k_c] = part.sizes
    sub_objective += part.objective
    logging.vlog(1, "super-cluster %d: %d points, %d sub-clusters, objective %.6g",
                 c, len(rows), k_c, part.objective)
  return HierarchicalResult(super_labels=super_labels, sub_labels=sub_labels,
                            super_objective=top.objective, sub_objective=sub_objective,
                            super_sizes=top.sizes.astype(np.int32), sub_sizes=sub_sizes)
