"""VGG-16-BN train step: deeper_jax (jitted, donated state) vs PyTorch, same work, one run.

One step = forward + backward + SGD-momentum update of VGG-16-BN (config D, BatchNorm,
fc6 → ReLU → Dropout(0.5) → fc7 as in deeper_jax) plus a 1000-way linear head on
ReLU(fc7), cross-entropy against random labels. Both sides: the same layer table, the
same init (He fan-out convs, N(0, 0.01) linears), SGD lr 0.01 momentum 0.9 with
coupled weight decay 1e-5, mean/std normalisation inside the model, float32.

PyTorch's model is defined here with plain ``torch.nn`` (torchvision cannot be installed
beside torch 2.13.0); it is measured both NCHW and channels_last and the faster is the
reference. Threads: torch.set_num_threads(N) and XLA's CPU pool both use the N cores of
this process's affinity mask (``taskset -c 0 python ...`` gives 1 thread to both).
Isolation: every side (JAX variant, torch format) lives in its own worker process, built
and warmed up once; only one side runs at a time, and in each round it runs
``--round-warmup`` untimed steps before its timed ones. Why: both frameworks fault in
GBs of fresh pages every step (XLA mmaps its temp buffer per execution: 177k faults per
step at 112 px, 620k at 224 px; PyTorch 60k-900k), and right after the other
framework's burst those faults cost 3-6x more system time on this VM (224 px JAX step:
4.8 s steadily alone, 6-8 s as the first step after a PyTorch step, with the same fault
count). A training run never interleaves like that, so neither side is timed cold.
Timing: warmup steps, then ``--repeats`` rounds that time ``--steps`` steps of every
side in turn (interleaved, ABBA order); images/s are medians over rounds, and the ratio
is the median over rounds of the within-round speed ratio (robust to a shared, noisy
machine: other processes' load varies by 5× within minutes here).

  python benchmarks/train_step_vs_torch.py --json /tmp/train_step.json
  python benchmarks/train_step_vs_torch.py --sizes 112 --jax-variants xla,patches
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import time

import numpy as np

# Runnable as `python benchmarks/train_step_vs_torch.py` from a plain checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_CLASSES = 1000
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-5
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


# ----------------------------------------------------------------------------- JAX side
def jax_step(variant: str, batch: int, size: int):
  """(step, state, inputs) for deeper_jax's VGG-16-BN; variant = conv_impl[-bf16]."""
  import jax
  import jax.numpy as jnp
  import optax

  from deeper_jax.models import build_backbone

  conv_impl, _, dtype = variant.partition("-")
  model = build_backbone(dict(name="vgg16_bn", conv_impl=conv_impl, mean=MEAN, std=STD,
                              dtype={"bf16": "bfloat16", "": "float32"}[dtype]))
  shape = (batch, size, size, 3)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))
  head = {"kernel": 0.01 * jax.random.normal(jax.random.key(1), (4096, NUM_CLASSES)),
          "bias": jnp.zeros(NUM_CLASSES)}
  params = {"backbone": variables["params"], "head": head}
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
  state = (params, variables["batch_stats"], tx.init(params))

  def step(state, images, labels, key):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      (features, _), updates = model.apply(
          {"params": params["backbone"], "batch_stats": batch_stats}, images, train=True,
          rngs={"dropout": key}, mutable=["batch_stats"])
      logits = jax.nn.relu(features) @ params["head"]["kernel"] + params["head"]["bias"]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=shape).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
  jitted = jax.jit(step, donate_argnums=0)
  box = {"state": state, "i": 0}

  def run():
    box["i"] += 1
    box["state"], loss = jitted(box["state"], images, labels, jax.random.key(box["i"]))
    return loss

  return run, lambda loss: float(loss)


# --------------------------------------------------------------------------- torch side
def torch_vgg16_bn():
  import torch
  from torch import nn

  layers, c = [], 3
  for stage in VGG16:
    for width in stage:
      layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width, momentum=0.1,
                                                                   eps=1e-5), nn.ReLU(True)]
      c = width
    layers.append(nn.MaxPool2d(2, 2))
  model = nn.Sequential(*layers)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      nn.init.zeros_(m.bias)
  return model


class TorchNet:
  """VGG-16-BN body (+ fc6/fc7 sized to the input), head, normalisation — as deeper_jax."""

  def __init__(self, size: int, channels_last: bool):
    import torch
    from torch import nn

    self.torch = torch
    body = torch_vgg16_bn()
    flat = 512 * (size // 32) ** 2
    fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, 4096), nn.ReLU(True), nn.Dropout(0.5),
                       nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, NUM_CLASSES))
    for m in fc.modules():
      if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)
    self.model = nn.Sequential(body, fc)
    self.format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = self.model.to(memory_format=self.format)
    self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    self.std = torch.tensor(STD).view(1, 3, 1, 1)
    self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM,
                               weight_decay=WEIGHT_DECAY)
    self.loss = nn.CrossEntropyLoss()

  def step_fn(self, batch: int, size: int):
    torch = self.torch
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g).to(memory_format=self.format)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    self.model.train()

    def run():
      x = ((images - self.mean) / self.std).contiguous(memory_format=self.format)
      loss = self.loss(self.model(x), labels)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
      return loss

    return run, lambda loss: float(loss.detach())


def param_counts_224() -> dict[str, int]:
  """Both models without the 1000-way head: the same network has the same count."""
  import jax
  import jax.numpy as jnp

  from deeper_jax.models import build_backbone

  net = TorchNet(224, channels_last=False)
  torch_count = sum(p.numel() for p in net.model.parameters()) - (4096 * NUM_CLASSES
                                                                    + NUM_CLASSES)
  model = build_backbone(dict(name="vgg16_bn"))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  jax_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  return {"torch": int(torch_count), "deeper_jax": jax_count}


# ------------------------------------------------------------------------------ harness
def _side_worker(conn, name: str, batch: int, size: int, threads: int) -> None:
  """Worker process of one side: builds it, then serves ``(warm, steps)`` timing requests."""
  framework, _, variant = name.partition(":")
  if framework == "jax":
    run, sync = jax_step(variant, batch, size)
  else:
    import torch
    torch.set_num_threads(threads)
    run, sync = TorchNet(size, variant == "channels_last").step_fn(batch, size)
  conn.send("ready")
  while (request := conn.recv()) is not None:
    warm, steps = request
    for _ in range(warm):
      sync(run())
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
      loss = run()
    sync(loss)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    conn.send({"wall": wall / steps, "user": (after.ru_utime - before.ru_utime) / steps,
               "sys": (after.ru_stime - before.ru_stime) / steps,
               "page_faults": (after.ru_minflt - before.ru_minflt) / steps})


class Side:
  """A side in its own process (spawned: no state shared with other sides)."""

  def __init__(self, name: str, batch: int, size: int, threads: int):
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_side_worker, args=(child, name, batch, size, threads))
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
  """Seconds per step of every side, per round; rounds interleave the sides.

  Each round times `steps` steps of each side in turn, the order reversed every other
  round (ABBA), so load from other processes lands on all sides alike; the caller
  compares sides within a round (ratios), which cancels slow drifts in that load.
  Each side first runs `round_warmup` untimed steps in its round: the step right after
  the *other* framework's burst is not what a training run sees (on this VM it paid
  2-5 s of extra system time at 224 px re-faulting pages the other process had just freed).
  Returns the wall seconds per step and the full per-round records (user/sys seconds
  and page faults per step).
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
        f"{n} {records[n][-1]['wall']:.2f} s/step (sys {records[n][-1]['sys']:.2f})"
        for n in names), flush=True)
  return {n: [rec["wall"] for rec in recs] for n, recs in records.items()}, records


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default="", help="write the results here")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--sizes", default="112,224")
  parser.add_argument("--jax-variants", default="auto",
                      help="comma list of conv_impl[-bf16]; the first is 'deeper_jax'")
  parser.add_argument("--torch-formats", default="channels_last,nchw")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--round-warmup", type=int, default=1,
                      help="untimed steps of a side before its timed steps in each round")
  args = parser.parse_args()

  import jax
  import torch

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  variants = args.jax_variants.split(",")
  formats = args.torch_formats.split(",")
  info = {"threads": threads, "jax": jax.__version__, "torch": torch.__version__,
          "backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "head": f"{NUM_CLASSES}-way CE on ReLU(fc7)",
          "jax_variants": variants, "timing": vars(args),
          "param_count_224": param_counts_224()}
  print(f"parameters at 224 (no head): {info['param_count_224']}", flush=True)
  cases = []
  for size in (int(s) for s in args.sizes.split(",")):
    print(f"batch {args.batch}, {size}x{size}: building", flush=True)
    names = [f"jax:{v}" for v in variants] + [f"torch:{f}" for f in formats]
    sides = {n: Side(n, args.batch, size, threads) for n in names}
    try:
      times, records = measure(sides, args.warmup, args.steps, args.repeats,
                               args.round_warmup)
    finally:
      for side in sides.values():
        side.close()
    ips = {n: args.batch / float(np.median(t)) for n, t in times.items()}
    # Per round: torch's faster format as the reference, each JAX variant's speed ratio.
    torch_best = np.min([times[f"torch:{f}"] for f in formats], axis=0)
    ratios = {v: float(np.median(torch_best / np.asarray(times[f"jax:{v}"])))
              for v in variants}
    torch_fmt = max(formats, key=lambda f: ips[f"torch:{f}"])
    case = {"batch": args.batch, "size": size,
            "images_per_sec": {"deeper_jax": ips[f"jax:{variants[0]}"],
                               "torch": ips[f"torch:{torch_fmt}"]},
            "ratio": ratios[variants[0]], "ratio_by_variant": ratios,
            "torch_format": torch_fmt, "all_images_per_sec": ips,
            "seconds_per_step": times, "per_round": records}
    cases.append(case)
    print(json.dumps(case), flush=True)
  result = {"cases": cases, "info": info}
  print("ratio = median over rounds of (torch's best s/step) / (deeper_jax s/step)")
  print(f"{'batch':>5} {'size':>5} {'deeper_jax':>11} {'torch':>8} {'ratio':>6}  by variant")
  for c in cases:
    print(f"{c['batch']:>5} {c['size']:>5} {c['images_per_sec']['deeper_jax']:>11.2f} "
          f"{c['images_per_sec']['torch']:>8.2f} {c['ratio']:>6.2f}  " +
          " ".join(f"{v}={r:.2f}" for v, r in c["ratio_by_variant"].items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
