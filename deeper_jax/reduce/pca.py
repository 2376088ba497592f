"""PCA-whitening then L2 normalisation: the features k-means sees (DeepCluster §3.3).

``fit_pca_whitening`` estimates the mean and covariance on a random sample of rows
(``sample_size``; the reference fits on a subset too, the full set is wasteful at
10^8 rows), sharded over the mesh: per-shard sums and centred cross-products are
``psum``-reduced, then ``jnp.linalg.eigh`` runs once on the [d, d] covariance.
Eigenvalues are floored at ``1e-5 * max`` (as the reference) so near-null
directions are not blown up, the top ``dim`` directions are kept, and the
whitening (division by sqrt eigenvalue) is folded into the projection, so applying
it is one matrix product per chunk followed by row L2 normalisation.

Covariance uses the unbiased ``1/(n-1)`` normalisation, so the whitened sample has
identity covariance in ``np.cov``'s sense (for directions above the floor).
Eigenvector signs are fixed (largest-magnitude entry positive) so a refit on the
same data gives the same features. Unlike k-means' integer sums, the float ``psum``
of the covariance adds in a different order on a different number of devices, so
features agree across device counts to ~1e-5, not bit for bit; and across
processes too (XLA:CPU adds the shards in order inside one process, gloo's ring
all-reduce in another order), so one process of 4 devices and two of 2 agree to
the last few bits only (tests/test_multiprocess.py measures it).

Many processes: ``x`` may be :class:`~deeper_jax.cluster.layout.Rows` (features
split over the devices of every process); the sample is gathered device to device
and ``apply_pca_whitening`` returns Rows in the same layout, so no process holds
more than its own rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from deeper_jax.cluster import checks, spill
from deeper_jax.cluster.layout import (RowLayout, Rows, gather_rows, plan_rows,
                                       put_rows, resolve_mesh, scan_chunks)
from deeper_jax.runtime.mesh import DATA_AXES

EIGENVALUE_FLOOR = 1e-5


class PCAWhitening(NamedTuple):
  mean: np.ndarray        # [d] float32
  projection: np.ndarray  # [d, dim] float32: top eigenvectors / sqrt(floored eigenvalue)


@functools.lru_cache(maxsize=16)
def _moments_fn(mesh: Mesh, layout: RowLayout):
  """Jitted (mean [d], covariance [d, d]) of the valid rows, two passes for accuracy."""

  def shard_fn(x):
    d = x.shape[1]

    def valid(rows, fresh):
      return (fresh & (rows < layout.num_rows))[:, None]

    def sum_body(total, xi, rows, fresh, _):
      return total + jnp.sum(jnp.where(valid(rows, fresh), xi, 0.0), axis=0), ()

    total, _ = scan_chunks(sum_body, jnp.zeros((d,), jnp.float32), x, layout)
    mean = lax.psum(total, DATA_AXES) / layout.num_rows

    def cov_body(acc, xi, rows, fresh, _):
      centred = jnp.where(valid(rows, fresh), xi - mean, 0.0)
      return acc + jnp.dot(centred.T, centred, precision=lax.Precision.HIGHEST), ()

    cross, _ = scan_chunks(cov_body, jnp.zeros((d, d), jnp.float32), x, layout)
    return mean, lax.psum(cross, DATA_AXES) / (layout.num_rows - 1)

  return jax.jit(jax.shard_map(shard_fn, mesh=mesh, in_specs=P(DATA_AXES),
                               out_specs=(P(), P()), check_vma=False))


@functools.partial(jax.jit, static_argnames="dim")
def _whitening(cov: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
  """(projection [d, dim], largest eigenvalue) from a covariance matrix."""
  eigenvalues, vectors = jnp.linalg.eigh(cov)  # ascending
  eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
  eigenvalues = jnp.maximum(eigenvalues, EIGENVALUE_FLOOR * eigenvalues[0])
  top = vectors[:, :dim]
  pivot = jnp.take_along_axis(top, jnp.argmax(jnp.abs(top), axis=0)[None], axis=0)
  top = top * jnp.where(pivot < 0, -1.0, 1.0)
  return top / jnp.sqrt(eigenvalues[:dim])[None, :], eigenvalues[0]


def sample_rows(num_rows: int, sample_size: int | None, seed: int) -> np.ndarray:
  """Sorted row ids the PCA is fitted on: all rows, or ``sample_size`` drawn by ``seed``."""
  if sample_size is None or sample_size >= num_rows:
    return np.arange(num_rows)
  return np.sort(np.random.default_rng(seed).choice(num_rows, size=sample_size, replace=False))


def fit_pca_whitening(x, dim: int, *, sample_size: int | None = None, seed: int = 0,
                      mesh: Mesh | None = None) -> PCAWhitening:
  """Fits mean and whitening projection [d, dim] on ``sample_size`` random rows of ``x``.

  ``x``: a numpy or jax matrix, or :class:`Rows` (then ``mesh`` is theirs).
  """
  n, d = checks.check_features(x, "x")
  if not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
    raise ValueError(f"dim must be an integer in [1, d={d}], got {dim!r}; lower pca_dim.")
  if sample_size is not None:
    checks.check_positive(sample_size, "sample_size")
  rows = sample_rows(n, sample_size, seed)
  m = len(rows)
  if m < 2:
    raise ValueError(f"PCA needs at least 2 rows to estimate a covariance, got {m}.")
  if isinstance(x, spill.Spilled):  # the sample only is read, each device its own slots
    sample, mesh = x.load_rows(rows), x.mesh
  elif isinstance(x, Rows):
    sample, mesh = (x if m == n else gather_rows(x, rows)), x.mesh
  else:
    sample = x if m == n else (x[jnp.asarray(rows)] if isinstance(x, jax.Array) else x[rows])
    mesh = resolve_mesh(mesh)
  layout = plan_rows(m, mesh.size, 8192)
  mean, cov = _moments_fn(mesh, layout)(put_rows(sample, mesh, layout))
  projection, top_eigenvalue = _whitening(cov, int(dim))
  if not float(top_eigenvalue) > 0:
    raise ValueError("x has zero variance on the PCA sample (all rows equal); "
                     "PCA whitening is undefined for such features.")
  return PCAWhitening(mean=np.asarray(mean), projection=np.asarray(projection))


@functools.lru_cache(maxsize=16)
def _apply_fn(mesh: Mesh, layout: RowLayout):

  def shard_fn(x, mean, projection):
    def body(carry, xi, rows, *_):
      y = jnp.dot(xi - mean, projection, precision=lax.Precision.HIGHEST)
      norm = jnp.sqrt(jnp.sum(y * y, axis=1, keepdims=True))
      y = y / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
      return carry, jnp.where((rows < layout.num_rows)[:, None], y, 0.0)  # padding stays 0

    _, y = scan_chunks(body, (), x, layout)
    return y

  return jax.jit(jax.shard_map(shard_fn, mesh=mesh, in_specs=(P(DATA_AXES), P(), P()),
                               out_specs=P(DATA_AXES), check_vma=False))


def apply_pca_whitening(pca: PCAWhitening, x, *, chunk_size: int = 8192,
                        mesh: Mesh | None = None, out_dir: str | None = None):
  """Whitened, L2-normalised features [N, dim] float32, computed chunk by chunk.

  Numpy [N, dim] for a numpy or jax ``x``; :class:`Rows` in the same layout (on the
  devices, nothing gathered) for Rows; for :class:`~deeper_jax.cluster.spill.Spilled`
  rows, Spilled rows in ``out_dir`` (each process streams its own files, a chunk
  at a time).
  """
  n, d = checks.check_features(x, "x")
  checks.check_positive(chunk_size, "chunk_size")
  if np.shape(pca.mean) != (d,) or np.shape(pca.projection)[0] != d:
    raise ValueError(f"x has d={d} columns but the PCA was fitted on "
                     f"{np.shape(pca.mean)[0]}; fit the PCA on features of this size.")
  if isinstance(x, spill.Spilled):
    return _apply_spilled(pca, x, chunk_size, out_dir)
  mesh = x.mesh if isinstance(x, Rows) else resolve_mesh(mesh)
  layout = plan_rows(n, mesh.size, chunk_size)
  y = _apply_fn(mesh, layout)(put_rows(x, mesh, layout), jnp.asarray(pca.mean, jnp.float32),
                              jnp.asarray(pca.projection, jnp.float32))
  if isinstance(x, Rows):
    return Rows(y, n)
  return np.asarray(y)[:n]


@jax.jit
def _apply_chunk(x, mean, projection):
  """The body of :func:`_apply_fn` on one chunk of rows (one device)."""
  y = jnp.dot(x - mean, projection, precision=lax.Precision.HIGHEST)
  norm = jnp.sqrt(jnp.sum(y * y, axis=1, keepdims=True))
  return y / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def _apply_spilled(pca: PCAWhitening, x: spill.Spilled, chunk_size: int, out_dir: str | None
                   ) -> spill.Spilled:
  """Whitens spilled rows file by file into spilled rows of ``out_dir``.

  Chunks as in memory (``plan_rows(N, S, chunk_size).chunk`` rows, the last one
  zero-padded), so that each row meets the same program shape.
  """
  if out_dir is None:
    raise ValueError("spilled features need an out_dir for their whitened rows.")
  chunk = plan_rows(x.num_rows, x.mesh.size, chunk_size).chunk
  device = x.mesh.local_devices[0]
  mean = jax.device_put(jnp.asarray(pca.mean, jnp.float32), device)
  projection = jax.device_put(jnp.asarray(pca.projection, jnp.float32), device)
  spill.clear(out_dir)
  writer = spill.Writer(out_dir, x.num_rows, projection.shape[1], x.mesh)
  for rows, block in x.chunks(chunk):
    padded = np.zeros((chunk, x.dim), np.float32)
    padded[:len(rows)] = block
    y = np.asarray(_apply_chunk(jax.device_put(padded, device), mean, projection))
    writer.write_rows(rows, y[:len(rows)])
  return writer.close()


def whitened(pca: PCAWhitening, x: np.ndarray) -> np.ndarray:
  """Whitened features *before* L2 normalisation (numpy; for checks and tests)."""
  return (np.asarray(x, np.float32) - pca.mean) @ pca.projection
