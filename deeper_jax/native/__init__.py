"""C++ kernels for Intel AMX, compiled on first use and registered as XLA FFI targets.

Why native code: XLA:CPU runs matrix products and convolutions in float32 on AVX-512
and upcasts bf16 dots, so it never reaches the AMX tile units of Sapphire Rapids and
later Xeons. The kernels here split float32 operands into bf16 hi + lo parts
(``amx_common.h``) and run the products on AMX: ``amx_dot.cc`` (k-means scores,
``clustering/amx_dot.py``) and ``amx_conv.cc`` (convolutions, ``models/amx_conv.py``).

Each source is compiled with the system ``g++`` into a per-user cache
(``$DEEPER_JAX_CACHE`` or ``~/.cache/deeper_jax``), keyed by a hash of the source, the
shared header, the flags and the jaxlib version, then loaded with ctypes. Users of a
kernel ask ``unavailable_reason(name, targets)`` first: None when the library is built,
loaded, granted AMX state by the OS and its targets registered for CPU; otherwise a
sentence saying why, for a log line or an error.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jaxlib

HERE = pathlib.Path(__file__).parent
HEADER = HERE / "amx_common.h"
FLAGS = ("-O3", "-march=sapphirerapids", "-std=c++17", "-fPIC", "-shared", "-w")


def _cpu_flags() -> set[str]:
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return set()
  for line in text.splitlines():
    if line.startswith("flags"):
      return set(line.split(":", 1)[1].split())
  return set()


def cache_dir() -> pathlib.Path:
  root = os.environ.get("DEEPER_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "deeper_jax")
  return pathlib.Path(root)


def build(name: str) -> pathlib.Path:
  """Compiles ``<name>.cc`` once per (source, header, flags, jaxlib); atomic, so
  concurrent processes (pytest workers) never load a half-written library."""
  source = HERE / f"{name}.cc"
  key = hashlib.sha256(source.read_bytes() + HEADER.read_bytes() + " ".join(FLAGS).encode()
                       + jaxlib.__version__.encode()).hexdigest()[:16]
  out = cache_dir() / f"{name}-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    cmd = ["g++", *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HERE}", str(source), "-o", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
      raise RuntimeError("no g++ on PATH") from e
    if proc.returncode != 0:
      raise RuntimeError(f"g++ failed: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


@functools.cache
def unavailable_reason(name: str, targets: tuple[str, ...]) -> str | None:
  """None if ``<name>.cc`` is built, loaded and its FFI ``targets`` registered."""
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    return f"needs Linux x86-64, this is {platform.system()} {platform.machine()}"
  missing = {"amx_bf16", "amx_tile"} - _cpu_flags()
  if missing:
    return f"this CPU lacks {', '.join(sorted(missing))}"
  try:
    lib = ctypes.cdll.LoadLibrary(str(build(name)))
  except (OSError, RuntimeError) as e:
    return f"could not build or load {name}.cc ({e})"
  if lib.deeper_jax_amx_enable() != 0:
    return "the OS refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
  for target in targets:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)),
                                platform="cpu")
  return None
