"""k-means scores ``x @ c.T + bias`` on Intel AMX tiles: the ``dot="bf16x3"`` option.

Why: the GEMM is most of a Lloyd pass, and XLA:CPU runs it in float32 (~270-330
GFLOP/s on this project's 2-core Sapphire Rapids machine; bf16 dots are upcast, so
XLA never reaches the AMX units). ``amx_dot.cc`` splits each float32 operand into
two bf16 numbers and multiplies them on AMX; measured ~2x XLA's float32 GEMM on the
k-means block shapes (benchmarks/README.md, k-means). Scores then carry at most
``relative_error("bf16x3", d)`` (9e-5 at d = 256; measured <= 2e-5) of ``||x|| ||c||`` instead of
float32's ``(d + 4) 2^-24``; lloyd.py's skip tests use whichever bound applies, so
pruned and plain passes still agree exactly; objectives agree with scikit-learn's
to ~2e-5 (benchmarks/README.md; tests/test_kmeans.py holds them to 1e-4).

The kernel (``native/amx_dot.cc``) is compiled on first use and registered as an XLA
FFI target for CPU (``deeper_jax.native``). ``dot="auto"`` (the default) uses it only
when this process can: Linux x86-64 with the ``amx_bf16`` and ``amx_tile`` CPU flags, a
compiler that builds it, the kernel granting AMX state, and CPU devices; otherwise
float32, with one log line saying why. GPU and TPU meshes always use XLA's dot.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from deeper_jax import native

DOTS = ("auto", "float32", "bf16x3")
TARGET = "deeper_jax_amx_dot"


def relative_error(dot: str, d: int) -> float:
  """Bound on ``|computed x.c - x.c| / (||x|| ||c||)`` for a resolved ``dot``.

  float32: any summation order of d products errs by <= (d + 4) 2^-24 (the +4
  spares rounding of the norms). bf16x3: v = hi + lo + r with |r| <= 2^-16 |v|;
  dropping lo_x.lo_c and the r terms costs <= 3.1 * 2^-16 per product; the bf16
  products are exact in float32 and 3 d32 of them are summed in float32.
  """
  if dot == "float32":
    return (d + 4) * 2.0**-24
  if dot == "bf16x3":
    d32 = -(-d // 32) * 32
    return 3.1 * 2.0**-16 + (3 * d32 + 4) * 2.0**-24
  raise ValueError(f"dot must be 'float32' or 'bf16x3' here, got {dot!r}.")


def check_dot(dot: str) -> None:
  if dot not in DOTS:
    raise ValueError(f"dot must be one of {DOTS}, got {dot!r}.")


def unavailable_reason() -> str | None:
  """None if the AMX kernel is built, loaded and registered; else why not."""
  return native.unavailable_reason("amx_dot", (TARGET,))


def resolve(dot: str, devices) -> str:
  """The dot a k-means on ``devices`` will use: 'float32' or 'bf16x3'."""
  check_dot(dot)
  if dot == "float32":
    return dot
  on_cpu = all(d.platform == "cpu" for d in devices)
  why = None if on_cpu else "the devices are not CPUs (XLA's dot is used there)"
  why = why or unavailable_reason()
  if why is None:
    return "bf16x3"
  if dot == "bf16x3":
    raise ValueError(f"dot='bf16x3' is not available: {why}; use dot='auto' or 'float32'.")
  _log_fallback_once(why)
  return "float32"


@functools.cache
def _log_fallback_once(why: str) -> None:
  logging.info("k-means scores use XLA's float32 dot: the AMX kernel %s.", why)


def scores(x: jax.Array, c: jax.Array, bias: jax.Array) -> jax.Array:
  """``x @ c.T + bias[None, :]`` [rows, n] float32 via the AMX kernel (CPU only)."""
  why = unavailable_reason()  # builds and registers the kernel on first use
  if why:
    raise RuntimeError(f"The AMX score kernel is not available: {why}; use dot='float32'.")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], c.shape[0]), jnp.float32))
  return call(x.astype(jnp.float32), c.astype(jnp.float32), bias.astype(jnp.float32))
