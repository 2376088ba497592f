"""Per-layer 3x3 convolution times: deeper_jax's conv implementations vs PyTorch (oneDNN).

For each VGG-16 layer shape (batch 8; the 112-px network by default) it times, in ms,
the forward pass, the input gradient and the kernel gradient of:

* ``amx``: deeper_jax's AMX kernels (``conv_impl='amx'``, bf16x3 split, ``native/amx_conv.cc``);
* ``xla``: XLA's own convolution and its autodiff (``conv_impl='xla'``);
* ``hybrid_dw``: the one-GEMM kernel gradient of ``conv_impl='hybrid'``;
* ``torch``: ``torch.nn.functional.conv2d`` and ``aten.convolution_backward`` on
  channels_last float32 tensors (oneDNN), the fastest PyTorch layout on this CPU.

Each framework runs in its own spawned process, one after the other, with the same
thread count (the cores of this process's affinity mask); every op is warmed up and
the best of ``--repeats`` runs is kept. The ratio columns are torch's time over
deeper_jax's (> 1: deeper_jax is faster). Also reports each amx result's max error
against XLA at HIGHEST precision, relative to the largest |value|.

  python benchmarks/conv_layers_vs_torch.py --json /tmp/conv_layers.json
  python benchmarks/conv_layers_vs_torch.py --size 224 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def layer_shapes(size: int, batch: int) -> list[tuple[int, int, int, int]]:
  """(batch, side, c_in, c_out) of every VGG-16 conv past the first (RGB) one."""
  shapes, c, side = [], 3, size
  for stage in VGG16:
    for width in stage:
      if c != 3:
        shapes.append((batch, side, c, width))
      c = width
    side //= 2
  return list(dict.fromkeys(shapes))  # repeated shapes once


def inputs(batch, side, c, n):
  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal((batch, side, side, c)), 0).astype(np.float32)
  k = (rng.standard_normal((3, 3, c, n)) * np.sqrt(2 / (9 * n))).astype(np.float32)
  dy = rng.standard_normal((batch, side, side, n)).astype(np.float32)
  return x, k, dy


def best_ms(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * min(times)


def jax_worker(shapes, repeats, queue):
  import jax
  import jax.numpy as jnp

  from deeper_jax.models import amx_conv
  from deeper_jax.models.conv import kernel_grad_by_gemm

  def xla_conv(x, k, precision=None):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)

  def timed(f, *args):
    f = jax.jit(f)
    return best_ms(lambda: jax.block_until_ready(f(*args)), repeats)

  def three(conv):
    fwd = lambda x, k, dy: conv(x, k)
    dx = lambda x, k, dy: jax.vjp(lambda x_: conv(x_, k), x)[1](dy)[0]
    dw = lambda x, k, dy: jax.vjp(lambda k_: conv(x, k_), k)[1](dy)[0]
    return fwd, dx, dw

  amx_ok = amx_conv.unavailable_reason() is None
  results = []
  for shape in shapes:
    x, k, dy = (jnp.asarray(a) for a in inputs(*shape))
    row = {"shape": shape}
    impls = {"xla": xla_conv}
    if amx_ok:
      impls["amx"] = lambda x_, k_: amx_conv.amx_conv(x_, k_, 1)
    for name, conv in impls.items():
      row[name] = [timed(f, x, k, dy) for f in three(conv)]
    row["hybrid_dw"] = timed(lambda x, dy: kernel_grad_by_gemm(x, dy, 3, 1), x, dy)
    if amx_ok:
      ref = [jax.jit(f)(x, k, dy) for f in three(lambda a, b: xla_conv(a, b, jax.lax.Precision.HIGHEST))]
      got = [jax.jit(f)(x, k, dy) for f in three(impls["amx"])]
      row["amx_rel_err"] = [float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
                            for g, r in zip(got, ref)]
    results.append(row)
    print(f"  jax {shape}: " + ", ".join(f"{n} {row[n]}" for n in impls), flush=True)
  queue.put(results)


def torch_worker(shapes, repeats, threads, queue):
  import torch

  torch.set_num_threads(threads)
  results = []
  for shape in shapes:
    x, k, dy = inputs(*shape)
    cl = torch.channels_last
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    wt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous(memory_format=cl)
    dyt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=cl)

    def backward(mask):
      return torch.ops.aten.convolution_backward(dyt, xt, wt, None, (1, 1), (1, 1), (1, 1),
                                                 False, (0, 0), 1, mask)

    with torch.no_grad():
      row = {"shape": shape, "torch": [
          best_ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1), repeats),
          best_ms(lambda: backward([True, False, False]), repeats),
          best_ms(lambda: backward([False, True, False]), repeats)]}
    results.append(row)
    print(f"  torch {shape}: {row['torch']}", flush=True)
  queue.put(results)


def run(target, *args):
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=target, args=(*args, queue))
  proc.start()
  out = queue.get()
  proc.join()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default="")
  parser.add_argument("--size", type=int, default=112, help="input size of the VGG network")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  threads = len(os.sched_getaffinity(0))
  shapes = layer_shapes(args.size, args.batch)
  jax_rows = run(jax_worker, shapes, args.repeats)
  torch_rows = run(torch_worker, shapes, args.repeats, threads)
  rows = [{**j, **t} for j, t in zip(jax_rows, torch_rows)]
  print(f"threads {threads}; ms: forward / input grad / kernel grad; ratio = torch / amx")
  print(f"{'layer':>18} {'amx':>20} {'xla':>20} {'hybrid dW':>9} {'torch':>20} {'ratio':>16}")
  for r in rows:
    b, side, c, n = r["shape"]
    amx = r.get("amx", [float("nan")] * 3)
    ratio = [t / a for t, a in zip(r["torch"], amx)]
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v)
    print(f"{f'{b}x{side}^2 {c}->{n}':>18} {fmt(amx):>20} {fmt(r['xla']):>20} "
          f"{r['hybrid_dw']:>9.1f} {fmt(r['torch']):>20} {'/'.join(f'{x:.2f}' for x in ratio):>16}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"threads": threads, "size": args.size, "batch": args.batch,
                 "layers": rows}, f, indent=1)


if __name__ == "__main__":
  main()
