"""Input pipeline: JPEG decoding rate at 224 px vs what the VGG-16-BN train step consumes.

Why this benchmark: on a photo folder (the YFCC path) every training image is a JPEG
decoded on the host. The question is whether ``deeper_jax/data/pipeline.py`` keeps the
train step fed: decoding must outpace the step, and the step must (almost) never wait.

Data: a folder of real photos built here from what this machine has — scikit-learn's
two sample photos and matplotlib's grace_hopper.jpg — as random 500×375 (or 375×500)
crops saved as JPEG quality 90 (~50-100 kB, a typical web photo), read by
``ImageFolderSource`` at 224 px (shorter side to 224, centre crop; its own 4 decode
threads per call, as in a run).

Three measurements:

1. **decode**: images/s through ``pipeline.batches`` over a plan of ``--decode-batch``-
   image steps, with 0 (the training thread), 1 and 2 worker processes; start-up (the
   wait for the first batch: spawning workers) is reported apart from the steady rate,
   timed once every worker has delivered.
2. **step**: images/s of the jitted VGG-16-BN DeeperCluster train step at 224 px (the
   step of ``benchmarks/train_step_vs_torch.py``: width 64, D = 4096, Sobel, S = 8,
   batch ``--batch``) on a fixed batch.
3. **fed**: the same step fed by the pipeline from the folder, as the training loop
   feeds it (``pipeline.local_blocks`` → ``pipeline.batches`` → ``device_batch``): the
   share of wall time spent waiting for the next batch, for 0 and 2 workers. The first fed step
   (workers starting) is reported apart.

  python benchmarks/input_pipeline.py --json benchmarks/results/input_pipeline.json
  python benchmarks/input_pipeline.py --quick     # thin VGG at 32 px: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # spawned workers inherit it

CROP = (500, 375)  # width, height of the saved photos (landscape; portrait when the photo is)


def photos() -> list[np.ndarray]:
  """The real photos on this machine: scikit-learn's samples and matplotlib's grace_hopper."""
  import matplotlib.cbook
  from PIL import Image
  from sklearn.datasets import load_sample_images
  images = list(load_sample_images().images)
  with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    images.append(np.asarray(Image.open(f).convert("RGB")))
  return images


def build_folder(root: str, count: int, seed: int = 0) -> dict:
  """``count`` random crops of the photos as JPEGs in ``root``; their mean size."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  sources, sizes = photos(), []
  for i in range(count):
    photo = sources[i % len(sources)]
    height, width = photo.shape[:2]
    w, h = CROP if width >= height else CROP[::-1]
    w, h = min(w, width), min(h, height)
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    crop = photo[top:top + h, left:left + w]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    path = os.path.join(root, f"{i:05d}.jpg")
    Image.fromarray(np.ascontiguousarray(crop)).save(path, quality=90)
    sizes.append(os.path.getsize(path))
  return {"images": count, "mean_kB": float(np.mean(sizes)) / 1e3,
          "crop": f"{CROP[0]}x{CROP[1]}", "photos": len(sources)}


def decode_rate(source, workers: int, steps: int, batch: int, prefetch: int) -> dict:
  """Images/s through the pipeline: the wait for the first batch (workers starting), then
  the steady rate, timed once every worker has delivered a batch."""
  from deeper_jax.data import pipeline
  rng = np.random.default_rng(workers)
  plan = rng.integers(0, len(source), (steps, 1, batch)).astype(np.int32)
  blocks = [(slice(0, 1), slice(0, batch))]
  start = time.perf_counter()
  feed = pipeline.batches(source, plan, blocks, workers=workers, kind="processes",
                          prefetch=prefetch)
  stamps = [time.perf_counter() for _ in feed]
  warm = max(workers, 1)  # batches until every worker has started
  return {"workers": workers, "first_batch_s": stamps[0] - start,
          "images_per_sec": (steps - warm) * batch / (stamps[-1] - stamps[warm - 1])}


def step_args(args) -> argparse.Namespace:
  """The VGG-16-BN step of train_step_vs_torch.py (its defaults), at this batch."""
  return argparse.Namespace(batch=args.batch, width=args.width, feature_dim=args.feature_dim,
                             num_super_clusters=2, num_sub_clusters=125, sobel=True)


def make_step(args):
  """(step, state, mesh, config) of deeper_jax's train step, as train/loop.py builds it."""
  import jax
  import train_step_vs_torch as ts  # benchmarks/ is the script's folder: sys.path[0]
  from deeper_jax.runtime import mesh as mesh_lib
  from deeper_jax.train import step as step_lib
  sargs = step_args(args)
  model, config, tx, head_tx, state = ts.jax_model_and_state(sargs, args.size, "float32")
  mesh = mesh_lib.make_mesh(ts.num_super(sargs))
  sharding = step_lib.state_shardings(state, mesh)
  step = step_lib.make_train_step(model, tx, head_tx, method=config.method,
                                  train_config=config.train, image_size=args.size, mesh=mesh,
                                  state_sharding=sharding)
  return step, jax.device_put(state, sharding), mesh, config


def step_rate(step, state, mesh, args) -> tuple[dict, object]:
  """Images/s of the step on one fixed batch (after a compiling warm-up step)."""
  import jax
  from deeper_jax.train import step as step_lib
  s = 8
  rng = np.random.default_rng(0)
  batch = jax.device_put(
      {"images": rng.integers(0, 256, (s, args.batch // s, args.size, args.size, 3), np.uint8),
       "sub_labels": rng.integers(0, 125, (s, args.batch // s)).astype(np.int32)},
      step_lib.batch_shardings(mesh))
  key = jax.random.key(0)
  state, metrics = step(state, batch, key)
  float(metrics["loss"])  # compiled and run once
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = step(state, batch, key)
    float(metrics["loss"])
    times.append(time.perf_counter() - t)
  return {"seconds_per_step": float(np.median(times)),
          "images_per_sec": args.batch / float(np.median(times))}, state


def fed_run(step, state, mesh, source, workers: int, args) -> tuple[dict, object]:
  """The step fed by the pipeline: time waiting for each batch vs the whole step."""
  import jax
  from deeper_jax.data import pipeline
  from deeper_jax.train import step as step_lib
  from deeper_jax.train.loop import device_batch
  s, b = 8, args.batch // 8
  rng = np.random.default_rng(100 + workers)
  plan = rng.integers(0, len(source), (args.steps + 1, s, b)).astype(np.int32)
  sub_labels = np.zeros(len(source), np.int32)
  shardings = step_lib.batch_shardings(mesh)
  blocks = pipeline.local_blocks(shardings["images"], plan.shape[1:])
  feed = pipeline.batches(source, plan, blocks, workers=workers, kind="processes",
                          prefetch=args.prefetch)
  key = jax.random.key(0)
  waits, totals = [], []
  for i in range(len(plan)):
    t0 = time.perf_counter()
    local = next(feed)
    batch = device_batch(source, plan[i], sub_labels, shardings, local)
    t1 = time.perf_counter()
    state, metrics = step(state, batch, key)
    float(metrics["loss"])  # the loop syncs every log_every_steps; here every step
    waits.append(t1 - t0)
    totals.append(time.perf_counter() - t0)
  feed.close()
  steady_wait, steady_total = sum(waits[1:]), sum(totals[1:])
  return {"workers": workers, "first_step_wait_s": waits[0],
          "steady_wait_s_per_step": steady_wait / args.steps,
          "steady_s_per_step": steady_total / args.steps,
          "wait_fraction": steady_wait / steady_total,
          "wait_fraction_with_first_step": sum(waits) / sum(totals)}, state


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default="", help="write the results here")
  parser.add_argument("--quick", action="store_true", help="thin VGG at 32 px, few steps")
  parser.add_argument("--images", type=int, default=192, help="JPEGs in the folder")
  parser.add_argument("--size", type=int, default=224, help="decode and crop size")
  parser.add_argument("--batch", type=int, default=8, help="train step batch (S = 8)")
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--feature-dim", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=6, help="timed train steps")
  parser.add_argument("--decode-steps", type=int, default=40)
  parser.add_argument("--decode-batch", type=int, default=32)
  parser.add_argument("--prefetch", type=int, default=2)
  args = parser.parse_args()
  if args.quick:
    args.width, args.feature_dim, args.size, args.steps = 4, 64, 32, 3
    args.images, args.decode_steps = 48, 4
  if args.batch % 8:
    parser.error(f"--batch must be a multiple of S = 8, got {args.batch}")
  return args


def main():
  args = parse_args()
  import jax
  from deeper_jax.data import ImageFolderSource
  results = {"info": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                      "jax": jax.__version__, "machine": platform.machine(),
                      "args": vars(args)}}
  with tempfile.TemporaryDirectory() as root:
    results["folder"] = build_folder(root, args.images)
    print(f"folder: {results['folder']}")
    source = ImageFolderSource(root, args.size)
    results["decode"] = []
    for workers in (0, 1, 2):
      row = decode_rate(source, workers, args.decode_steps, args.decode_batch, args.prefetch)
      results["decode"].append(row)
      print(f"decode, {workers} workers: {row['images_per_sec']:.1f} images/s "
            f"(first batch after {row['first_batch_s']:.2f} s)")
    step, state, mesh, _ = make_step(args)
    results["step"], state = step_rate(step, state, mesh, args)
    print(f"train step: {results['step']['images_per_sec']:.2f} images/s "
          f"({results['step']['seconds_per_step']:.2f} s/step, batch {args.batch})")
    results["fed"] = []
    for workers in (0, 2):
      row, state = fed_run(step, state, mesh, source, workers, args)
      results["fed"].append(row)
      print(f"fed, {workers} workers: waits {100 * row['wait_fraction']:.2f}% of step time "
            f"(first step waited {row['first_step_wait_s']:.2f} s)")
  results["info"]["load_average_at_end"] = os.getloadavg()
  print("\n| workers | decode images/s | first batch s | fed: wait % of step time | "
        "first fed step wait s |")
  print("|---|---|---|---|---|")
  fed = {row["workers"]: row for row in results["fed"]}
  for row in results["decode"]:
    w = row["workers"]
    wait = f"{100 * fed[w]['wait_fraction']:.2f}" if w in fed else "–"
    first = f"{fed[w]['first_step_wait_s']:.2f}" if w in fed else "–"
    print(f"| {w} | {row['images_per_sec']:.1f} | {row['first_batch_s']:.2f} | {wait} | "
          f"{first} |")
  print(f"\ntrain step consumes {results['step']['images_per_sec']:.2f} images/s "
        f"(VGG-16-BN, {args.size} px, batch {args.batch})")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
