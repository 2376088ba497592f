"""Input validation shared by k-means, PCA and the hierarchical driver.

Each check raises one ``ValueError`` whose single sentence names the bad input and
the fix, before any device work starts (a NaN found after ten Lloyd iterations
would be a much worse message).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INITS = ("random", "kmeans++")


def check_features(x, name: str = "x") -> tuple[int, int]:
  """``x`` must be a finite 2-D float matrix with at least one row; returns (N, d)."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"{name} must be a 2-D [N, d] array of features, got shape {shape}.")
  n, d = int(shape[0]), int(shape[1])
  if n < 1 or d < 1:
    raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}.")
  if hasattr(x, "chunks"):  # spilled rows: checked as they are streamed (cluster/streamed.py)
    return n, d
  values = getattr(x, "array", x)  # Rows: the global array (its padding rows are zeros)
  finite = (bool(jnp.isfinite(values).all()) if isinstance(values, jax.Array)
            else bool(np.isfinite(values).all()))
  if not finite:
    raise ValueError(f"{name} contains NaN or inf values; remove or repair those rows first.")
  return n, d


def check_num_clusters(k, n: int, name: str = "k") -> None:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {k!r}.")
  if k > n:
    raise ValueError(f"{name}={k} is larger than the number of points N={n}; use {name} <= N.")


def check_init(init: str) -> None:
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}.")


def check_centroids(centroids, k: int, d: int) -> np.ndarray:
  """Explicit initial centroids: a finite [k, d] matrix matching ``k`` and ``x``'s d."""
  c = np.asarray(centroids, np.float32)
  if c.shape != (k, d):
    raise ValueError(
        f"init_centroids has shape {c.shape} but must be [k, d] = ({k}, {d}) to match k and x.")
  if not np.isfinite(c).all():
    raise ValueError("init_centroids contains NaN or inf values; pass finite centroids.")
  return c


def check_positive(value, name: str) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
