"""DeeperCluster train step on VGG-16-BN: deeper_jax's real step vs the same work in PyTorch.

Why this benchmark: the train step is most of a run's time, and PyTorch on CPU (oneDNN)
is the reference implementation's framework. deeper_jax's side is the step the training
loop runs, ``deeper_jax.train.step.make_train_step`` (one ``jax.jit``, state donated),
built the way ``train/loop.py`` builds it from a ``configs/default.py`` config. The
PyTorch side is written here with plain ``torch`` (torchvision does not install beside
the torch 2.13.0 CPU wheel) and does the same work, inside the timed step:

1. uint8 images ``[S, b, L, L, 3]`` (L = load size) → float / 255;
2. RandomResizedCrop to ``size`` (torchvision's box draw: scale (0.08, 1), ratio
   (3/4, 4/3), 10 tries then a central fallback; bilinear, antialiased), horizontal
   flip with p = 1/2, slice ``s`` rotated by ``(s % 4)·90°``;
3. normalisation by the ImageNet mean/std, the Sobel front end when ``--sobel``
   (grayscale, fixed 3×3 Sobel pair, conv1_1 VALID on the map, as ``models/sobel.py``);
4. VGG-16-BN (13 conv-BN-ReLU, 5 max-pools, fc6 → ReLU → Dropout 0.5 → fc7), train-mode
   BatchNorm over the whole batch;
5. eq. 5: CE of the super-class head V (S-way) + CE of each slice's own sub-head W_s
   (k_sub-way) on ReLU(fc7), accuracies; W's gradient × S (``sub_head_grad='per_group'``);
6. SGD momentum 0.9, coupled weight decay, on backbone and heads.

Same layer table (read from ``deeper_jax.models.architectures``), same inits, same
parameter count (checked at start-up), float32 on both sides unless a ``bfloat16``
JAX variant is asked for (``model.dtype='bfloat16'``: bf16 compute, float32 parameters;
PyTorch stays float32). PyTorch runs NCHW and channels_last; the faster is the reference.
Only the random draws differ (each framework's own RNG).

Threads: ``torch.set_num_threads(N)``; XLA:CPU sizes its pool from the same affinity
mask (``taskset -c 0 python ...`` gives 1 thread to both). JAX runs on XLA:CPU
(``JAX_PLATFORMS=cpu`` unless set): the peer is a CPU wheel.
Isolation: every side (JAX variant, torch format) lives in its own spawned worker
process, built and warmed up once; only one side runs at a time, and in each round it
runs ``--round-warmup`` untimed steps before its timed ones (both frameworks fault in
GBs of fresh pages per step, and right after the other framework's burst those faults
cost several times more system time: a training run never interleaves like that).
Timing: ``--repeats`` rounds that time ``--steps`` steps of every side in turn, the
order reversed every other round (ABBA); images/s are medians over rounds, and the
ratio is the median over rounds of (PyTorch's best s/step) / (deeper_jax s/step).

  python benchmarks/train_step_vs_torch.py --json benchmarks/results/train_step_vs_torch_$(date +%F).json
  python benchmarks/train_step_vs_torch.py --quick          # thin VGG at 32 px, a smoke run
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import time

import numpy as np

# deeper_jax and configs come from the installed package (pip install -e .).
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # spawned workers inherit it

# The step's recipe, shared with the PyTorch side (vgg16_torch.py).
from vgg16_torch import (CROP_RATIO, CROP_SCALE, LR, MEAN, MOMENTUM,  # noqa: E402
                         NUM_ROTATIONS, STD, WEIGHT_DECAY, TorchNet)

DTYPES = ("float32", "bfloat16")


def load_size(size: int) -> int:
  """Side the images are stored at: the reference's Resize(256) for 224 crops."""
  return round(size * 256 / 224)


def make_config(args, size: int, dtype: str = "float32"):
  """The ``configs/default.py`` config of this benchmark's network, method and step."""
  from configs import default

  config = default.get_config()
  config.data.name = "image_folder"     # RGB images, as configs/paper_vgg16_yfcc.py
  config.data.image_size = size
  config.data.load_size = load_size(size)
  config.data.channels = 3
  m = config.model
  m.name, m.width, m.feature_dim = "vgg16_bn", args.width, args.feature_dim
  m.sobel, m.fc_init, m.dtype, m.mean, m.std = args.sobel, "torch", dtype, MEAN, STD
  method = config.method
  method.num_rotations = NUM_ROTATIONS
  method.num_super_clusters = args.num_super_clusters
  method.num_sub_clusters = args.num_sub_clusters
  method.loss, method.head_init, method.sub_head_grad = "hierarchical", "torch", "per_group"
  t = config.train
  t.batch_size, t.learning_rate, t.momentum, t.weight_decay = (args.batch, LR, MOMENTUM,
                                                               WEIGHT_DECAY)
  t.crop, t.crop_scale, t.crop_ratio = "random_resized", CROP_SCALE, CROP_RATIO
  config.clustering.pca_dim = min(config.clustering.pca_dim, args.feature_dim)
  return config


def num_super(args) -> int:
  return NUM_ROTATIONS * args.num_super_clusters


def batch_arrays(args, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The same uint8 images [S, b, L, L, 3] and sub-cluster ids [S, b] for every side."""
  s = num_super(args)
  b, side = args.batch // s, load_size(size)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (s, b, side, side, 3), dtype=np.uint8)
  return images, rng.integers(0, args.num_sub_clusters, (s, b)).astype(np.int32)


# ----------------------------------------------------------------------------- JAX side
def jax_model_and_state(args, size: int, dtype: str):
  """(model, config, tx, head_tx, state) exactly as train/loop.py starts a phase."""
  from deeper_jax.models import build_backbone
  from deeper_jax.train import state as state_lib
  from deeper_jax.train import step as step_lib

  config = make_config(args, size, dtype)
  model = build_backbone(config.model)
  tx, head_tx = step_lib.make_optimizer(config.train), step_lib.make_optimizer(config.train)
  variables = state_lib.init_variables(model, config, 3)
  state = state_lib.start_phase(variables, 0, config, config.method, tx, head_tx, phase=0)
  return model, config, tx, head_tx, state


def jax_step(args, size: int, dtype: str):
  """(run, sync) of deeper_jax's jitted, donated train step on one fixed batch."""
  import jax

  from deeper_jax import config_checks
  from deeper_jax.runtime import mesh as mesh_lib
  from deeper_jax.train import step as step_lib

  model, config, tx, head_tx, state = jax_model_and_state(args, size, dtype)
  config_checks.check_config(config, jax.device_count())  # a config a real run accepts
  mesh = mesh_lib.make_mesh(num_super(args))
  sharding = step_lib.state_shardings(state, mesh)
  step = step_lib.make_train_step(model, tx, head_tx, method=config.method,
                                  train_config=config.train, image_size=size, mesh=mesh,
                                  state_sharding=sharding)
  images, sub_labels = batch_arrays(args, size)
  batch = jax.device_put({"images": images, "sub_labels": sub_labels},
                         step_lib.batch_shardings(mesh))
  rng = jax.random.key(config.seed)
  box = {"state": jax.device_put(state, sharding)}

  def run():
    box["state"], metrics = step(box["state"], batch, rng)
    return metrics["loss"]

  return run, lambda loss: float(loss)


def jax_param_count(args, size: int) -> int:
  """Backbone + heads parameters, from shapes only."""
  import jax

  shapes = jax.eval_shape(lambda: jax_model_and_state(args, size, "float32")[-1])
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves((shapes.params, shapes.heads)))


# ------------------------------------------------------------------------------ harness
def _side_worker(conn, name: str, args, size: int, threads: int) -> None:
  """Worker process of one side: builds it, then serves ``(warm, steps)`` timing requests."""
  framework, _, variant = name.partition(":")
  if framework == "jax":
    run, sync = jax_step(args, size, variant)
  else:
    import torch
    torch.set_num_threads(threads)
    run, sync = TorchNet(args, size, variant == "channels_last").step_fn(
        *batch_arrays(args, size))
  conn.send("ready")
  while (request := conn.recv()) is not None:
    warm, steps = request
    for _ in range(warm):
      sync(run())
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
      loss = run()
    last = sync(loss)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    conn.send({"wall": wall / steps, "user": (after.ru_utime - before.ru_utime) / steps,
               "sys": (after.ru_stime - before.ru_stime) / steps,
               "page_faults": (after.ru_minflt - before.ru_minflt) / steps, "loss": last})


class Side:
  """A side in its own process (spawned: no state shared with other sides)."""

  def __init__(self, name: str, args, size: int, threads: int):
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_side_worker, args=(child, name, args, size, threads))
    self.process.start()
    if self.conn.recv() != "ready":
      raise RuntimeError(f"side {name} failed to start")

  def time_steps(self, steps: int, warm: int = 0) -> dict[str, float]:
    """Per-step wall/user/sys seconds and page faults of ``steps`` steps after ``warm``."""
    self.conn.send((warm, steps))
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send(None)
    self.process.join()


def measure(sides: dict, warmup: int, steps: int, repeats: int, round_warmup: int
            ) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
  """Seconds per step of every side, per round; rounds interleave the sides (ABBA).

  Load from other processes lands on all sides alike, and the caller compares sides
  within a round (ratios), which cancels slow drifts in that load. Returns the wall
  seconds per step and the full per-round records (user/sys seconds, page faults).
  """
  records = {name: [] for name in sides}
  for name, side in sides.items():
    if warmup:
      side.time_steps(warmup)
    print(f"  warmed up {name}", flush=True)
  names = list(sides)
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      records[name].append(sides[name].time_steps(steps, round_warmup))
    print(f"  round {r + 1}/{repeats}: " + ", ".join(
        f"{n} {records[n][-1]['wall']:.3f} s/step (sys {records[n][-1]['sys']:.2f}, "
        f"loss {records[n][-1]['loss']:.3f})" for n in names), flush=True)
  return {n: [rec["wall"] for rec in recs] for n, recs in records.items()}, records


def check_args(parser, args) -> None:
  s = num_super(args)
  if args.batch % s:
    parser.error(f"--batch {args.batch} must be a multiple of S = 4 x "
                 f"--num-super-clusters = {s}")
  bad = sorted(set(args.jax_variants) - set(DTYPES))
  if bad:
    parser.error(f"--jax-variants: unknown {bad}; choose from {DTYPES}")
  bad = sorted(set(args.torch_formats) - {"channels_last", "nchw"})
  if bad:
    parser.error(f"--torch-formats: unknown {bad}; choose from channels_last, nchw")


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default="", help="write the results here")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: width-4 VGG, 64-d features, 32 px, 2 rounds")
  parser.add_argument("--batch", type=int, default=8, help="global batch, S x b")
  parser.add_argument("--sizes", default="112,224", help="crop sizes (images stored at 256/224 x)")
  parser.add_argument("--width", type=int, default=64, help="VGG's first-stage channels")
  parser.add_argument("--feature-dim", type=int, default=4096, help="fc6/fc7 width D")
  parser.add_argument("--num-super-clusters", type=int, default=2, help="m; S = 4m")
  parser.add_argument("--num-sub-clusters", type=int, default=125, help="k_sub per super-class")
  parser.add_argument("--sobel", action=argparse.BooleanOptionalAction, default=True,
                      help="Sobel front end (paper); --no-sobel feeds RGB")
  parser.add_argument("--jax-variants", default="float32",
                      help="model.dtype values; the first is 'deeper_jax'")
  parser.add_argument("--torch-formats", default="channels_last,nchw")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--round-warmup", type=int, default=1,
                      help="untimed steps of a side before its timed steps in each round")
  args = parser.parse_args()
  if args.quick:
    args.width, args.feature_dim, args.sizes = 4, 64, "32"
    args.warmup, args.repeats = 1, 2
  args.jax_variants = args.jax_variants.split(",")
  args.torch_formats = args.torch_formats.split(",")
  check_args(parser, args)
  return args


def main():
  args = parse_args()
  import jax
  import torch

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  sizes = [int(s) for s in args.sizes.split(",")]
  counts = {"deeper_jax": jax_param_count(args, sizes[0]),
            "torch": TorchNet(args, sizes[0], channels_last=False).param_count()}
  print(f"parameters at {sizes[0]} px (backbone + heads): {counts}", flush=True)
  if counts["deeper_jax"] != counts["torch"]:
    raise SystemExit(f"the two networks differ: {counts}")
  info = {"threads": threads, "jax": jax.__version__, "torch": torch.__version__,
          "backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "step": (f"deeper_jax.train.step.make_train_step; S={num_super(args)} "
                   f"(R=4, m={args.num_super_clusters}), k_sub={args.num_sub_clusters}, "
                   f"random-resized crops from {[load_size(s) for s in sizes]} px, "
                   f"sobel={args.sobel}"),
          "args": vars(args), "param_count": counts}
  cases = []
  for size in sizes:
    print(f"batch {args.batch}, {size}x{size} crops of {load_size(size)}-px images: building",
          flush=True)
    names = ([f"jax:{v}" for v in args.jax_variants]
             + [f"torch:{f}" for f in args.torch_formats])
    sides = {}
    try:
      for n in names:
        sides[n] = Side(n, args, size, threads)
      times, records = measure(sides, args.warmup, args.steps, args.repeats,
                               args.round_warmup)
    finally:
      for side in sides.values():
        side.close()
    ips = {n: args.batch / float(np.median(t)) for n, t in times.items()}
    # Per round: torch's faster format as the reference, each JAX variant's speed ratio.
    torch_best = np.min([times[f"torch:{f}"] for f in args.torch_formats], axis=0)
    ratios = {v: float(np.median(torch_best / np.asarray(times[f"jax:{v}"])))
              for v in args.jax_variants}
    torch_fmt = max(args.torch_formats, key=lambda f: ips[f"torch:{f}"])
    first = args.jax_variants[0]
    case = {"batch": args.batch, "size": size, "load_size": load_size(size),
            "images_per_sec": {"deeper_jax": ips[f"jax:{first}"],
                               "torch": ips[f"torch:{torch_fmt}"]},
            "ratio": ratios[first], "ratio_by_variant": ratios,
            "torch_format": torch_fmt, "all_images_per_sec": ips,
            "seconds_per_step": times, "per_round": records}
    cases.append(case)
  print("ratio = median over rounds of (torch's best s/step) / (deeper_jax s/step)")
  print(f"{'batch':>5} {'size':>5} {'deeper_jax':>11} {'torch':>8} {'ratio':>6}  by variant")
  for c in cases:
    print(f"{c['batch']:>5} {c['size']:>5} {c['images_per_sec']['deeper_jax']:>11.2f} "
          f"{c['images_per_sec']['torch']:>8.2f} {c['ratio']:>6.2f}  " +
          " ".join(f"{v}={r:.2f}" for v, r in c["ratio_by_variant"].items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cases": cases, "info": info}, f, indent=1)


if __name__ == "__main__":
  main()
