"""The cost model of docs/scaling.md, measured: 1 vs 2 processes, N vs 2N vs 4N.

    python benchmarks/scaling.py --json benchmarks/results/scaling_$(date +%F).json
    python benchmarks/scaling.py --time --json benchmarks/results/scaling_time_$(date +%F).json
    python benchmarks/scaling.py --quick     # small sizes, a smoke run (with --time too)

Each point is one job of P processes on localhost (jax.distributed, gloo), with
``2 / P`` CPU devices each, so every point uses the same 2 devices: what changes
with P is only how rows and work are split between processes. Per process it
measures, after a warm-up at the same shapes (compilation excluded; times are the
best of ``REPEATS`` runs):

* extraction: ``features.map_rows`` of a fixed random projection of 8x8 synthetic
  images to D features (``2·64·D`` FLOP per row), seconds, and the peak RSS growth
  over it (the process's features are held on its devices: predicted ``N·D·4/P``);
* the same extraction spilled to disk (cluster/spill.py): seconds, peak RSS growth
  (predicted: a few batches, independent of N);
* k-means of the features (k clusters, ``ITERS`` Lloyd iterations; in memory and
  streamed from the spill): seconds per iteration (predicted: ``∝ N·k·D / S``
  FLOP for the scoring, plus one ``k·D`` integer all-reduce).

``--time`` checks the time side of the model instead: every process is pinned to a
core of its own with one device, so P processes have P times the compute (as P hosts
would), on compute-bound shapes (32x32x3 images projected to D = 1024 features, k-means
with k = 256 and no pruning). Each process first measures its own core's rate r on the
two kernels that dominate (the extraction matmul and the k-means scores) and the cost
of producing an image t_in; the model then predicts, for its ``N / P`` rows,

* extraction: ``N/P · (t_in + 2·in·D / r_extract)`` (one core: decode and compute
  take turns);
* a Lloyd iteration: ``2·(N/P)·k·D / r_scores`` for the scores, the rest (argmin,
  the exact integer sums, one all-reduce) left out of the model and seen in the ratio;
  measured inside the loop (the median gap between ``progress`` callbacks).

Run it on an otherwise idle machine: the points pin to cores 0 and 1.

The JSON holds every process's raw numbers and the model's predictions beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE, ITERS, REPEATS = 8, 8, 2
FULL = {"n_values": (8192, 16384, 32768), "d": 1024, "k": 64, "processes": (1, 2)}
QUICK = {"n_values": (1024, 2048), "d": 128, "k": 8, "processes": (1, 2)}
TIME = {"n_values": (4096, 8192, 16384), "d": 1024, "k": 256, "side": 32, "channels": 3,
        "processes": (1, 2)}
TIME_QUICK = {"n_values": (1024, 2048), "d": 128, "k": 16, "side": 16, "channels": 3,
              "processes": (1, 2)}


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(field)


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


class Images:
  """Synthetic ``side x side x channels`` images (two prototypes plus per-index noise)."""

  def __init__(self, n, side: int = SIDE, channels: int = 1):
    self.n, self.image_shape = n, (side, side, channels)
    self.prototypes = np.random.default_rng(0).integers(0, 256, (2, *self.image_shape))
    self.pixel_offsets = np.arange(side * side * channels).reshape(1, *self.image_shape) * 40503

  def __len__(self):
    return self.n

  def images(self, indices):
    indices = np.asarray(indices)
    noise = (indices[:, None, None, None] * 2654435761 + self.pixel_offsets) % 61
    return ((self.prototypes[indices % 2] + noise) % 256).astype(np.uint8)


def _seconds(fn) -> float:
  """Best of ``REPEATS`` runs (the machine is shared)."""
  best = float("inf")
  for _ in range(REPEATS):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def per_iteration(cluster, x) -> float:
  """(time of ITERS iterations - time of none) / ITERS: init, the first assignment and
  the final objective cancel out."""
  return (_seconds(lambda: cluster(x, ITERS)) - _seconds(lambda: cluster(x, 0))) / ITERS


def worker(coordinator: str, processes: int, pid: int, n: int, d: int, k: int, out: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if processes > 1:
    jax.distributed.initialize(coordinator, processes, pid)
  from deeper_jax.cluster import kmeans as kmeans_lib  # pylint: disable=g-import-not-at-top
  from deeper_jax.extract import features  # pylint: disable=g-import-not-at-top
  from deeper_jax.runtime.mesh import make_mesh  # pylint: disable=g-import-not-at-top

  mesh = make_mesh()
  projection = jnp.asarray(np.random.default_rng(1).normal(size=(SIDE * SIDE, d)), jnp.float32)
  fn = jax.jit(lambda images: {"f": (images.reshape(images.shape[0], -1) / 255.0) @ projection})
  extract = lambda: features.map_rows(fn, Images(n), np.arange(n), batch_size=512,
                                      out_dims={"f": d}, mesh=mesh)["f"]
  directory = os.path.join(out, f"spill_p{processes}_n{n}")
  spill = lambda: features.spill_rows(fn, Images(n), np.arange(n), directory, output="f",
                                      batch_size=512, out_dims={"f": d}, mesh=mesh)
  cluster = lambda x, iters: kmeans_lib.kmeans(x, k, num_iters=iters, seed=0)
  record = {"process": pid, "processes": processes, "devices": jax.local_device_count(),
            "n": n, "d": d, "k": k}

  warm = extract()  # compile everything at these shapes
  cluster(warm, 1)
  del warm
  _reset_peak()
  before = _status("VmRSS")
  start = time.perf_counter()
  rows = extract()
  jax.block_until_ready(rows.array)
  record["extract_s"] = time.perf_counter() - start
  record["extract_peak_growth_bytes"] = _status("VmHWM") - before
  record["own_feature_bytes"] = sum(s.data.nbytes for s in rows.array.addressable_shards)
  record["kmeans_s_per_iter"] = per_iteration(cluster, rows)
  del rows

  on_disk = spill()
  cluster(on_disk, 1)
  on_disk.remove()
  _reset_peak()
  before = _status("VmRSS")
  start = time.perf_counter()
  on_disk = spill()
  record["spill_extract_s"] = time.perf_counter() - start
  record["spill_extract_peak_growth_bytes"] = _status("VmHWM") - before
  _reset_peak()
  before = _status("VmRSS")
  record["streamed_kmeans_s_per_iter"] = per_iteration(cluster, on_disk)
  record["streamed_kmeans_peak_growth_bytes"] = _status("VmHWM") - before
  on_disk.remove()
  with open(os.path.join(out, f"p{processes}_n{n}_process{pid}.json"), "w") as f:
    json.dump(record, f)


def _rate(fn, *args, flop: float) -> float:
  """FLOP/s of a jitted ``fn(*args)``, after a warm-up."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  return flop / _seconds(lambda: jax.block_until_ready(fn(*args)))


def time_worker(coordinator: str, processes: int, pid: int, n: int, sizes: dict, out: str):
  """One process of a ``--time`` point: pinned to core ``pid``, one device."""
  os.sched_setaffinity(0, {pid % os.cpu_count()})
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if processes > 1:
    jax.distributed.initialize(coordinator, processes, pid)
  from deeper_jax.cluster import kmeans as kmeans_lib  # pylint: disable=g-import-not-at-top
  from deeper_jax.extract import features  # pylint: disable=g-import-not-at-top
  from deeper_jax.runtime.mesh import make_mesh  # pylint: disable=g-import-not-at-top

  d, k, side, channels = sizes["d"], sizes["k"], sizes["side"], sizes["channels"]
  inputs, batch, chunk = side * side * channels, 512, 8192
  mesh, source = make_mesh(), Images(n, side, channels)
  projection = jnp.asarray(np.random.default_rng(1).normal(size=(inputs, d)), jnp.float32)
  project = lambda images: (images.reshape(images.shape[0], -1) / 255.0) @ projection
  fn = jax.jit(lambda images: {"f": project(images)})
  record = {"process": pid, "processes": processes, "devices": jax.local_device_count(),
            "cores": sorted(os.sched_getaffinity(0)), "n": n, "d": d, "k": k, "side": side,
            "channels": channels}

  # This core's rates on the kernels the model counts, and the cost of an input image.
  local = jnp.asarray(source.images(np.arange(batch)))
  record["r_extract"] = _rate(jax.jit(project), local, flop=2 * batch * inputs * d)
  rows, centroids = jnp.ones((chunk, d)), jnp.ones((k, d))
  record["r_scores"] = _rate(jax.jit(lambda x, c: x @ c.T), rows, centroids,
                            flop=2 * chunk * k * d)
  record["t_in"] = _seconds(lambda: source.images(np.arange(batch))) / batch

  extract = lambda: features.map_rows(fn, source, np.arange(n), batch_size=batch,
                                      out_dims={"f": d}, mesh=mesh)["f"]
  warm = extract()  # compile at these shapes
  record["extract_s"] = _seconds(lambda: jax.block_until_ready(extract().array))
  feats = extract()
  # Lloyd iterations timed from inside the loop: the gaps between progress callbacks
  # (each waits for its iteration's objective), median of the second call's.
  for _ in range(2):
    stamps = []
    kmeans_lib.kmeans(feats, k, num_iters=ITERS, seed=0, prune=False,
                      progress=lambda *_: stamps.append(time.perf_counter()))
  record["kmeans_s_per_iter"] = float(np.median(np.diff(stamps)))
  with open(os.path.join(out, f"time_p{processes}_n{n}_process{pid}.json"), "w") as f:
    json.dump(record, f)


def time_predictions(record: dict) -> dict:
  """The time model for one process of a ``--time`` point, from its own core's rates."""
  own = record["n"] / record["processes"]
  inputs = record["side"] ** 2 * record["channels"]
  extract = own * (record["t_in"] + 2 * inputs * record["d"] / record["r_extract"])
  kmeans = 2 * own * record["k"] * record["d"] / record["r_scores"]
  return {"extract_s": extract, "kmeans_s_per_iter": kmeans,
          "extract_ratio": record["extract_s"] / extract,
          "kmeans_ratio": record["kmeans_s_per_iter"] / kmeans}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_point(processes: int, n: int, sizes: dict, out: str, timing: bool) -> list[dict]:
  """Launches one point's processes; their records, in process order."""
  devices = 1 if timing else 2 // processes
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"127.0.0.1:{port}",
                             str(processes), str(i), str(n), json.dumps(sizes), out,
                             "time" if timing else "memory"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  for proc in procs:
    if proc.wait() != 0:
      raise RuntimeError(proc.communicate()[1][-3000:])
  prefix = "time_" if timing else ""
  return [json.load(open(os.path.join(out, f"{prefix}p{processes}_n{n}_process{i}.json")))
          for i in range(processes)]


def predictions(record: dict) -> dict:
  """The cost model's numbers for one process of one point."""
  n, d, k, p = record["n"], record["d"], record["k"], record["processes"]
  return {"own_feature_bytes": n * d * 4 // p,
          "extract_flop_per_process": 2 * n * SIDE * SIDE * d // p,
          "kmeans_flop_per_iter_per_process": 2 * n * k * d // p,
          "allreduce_bytes_per_iter": 2 * 4 * k * d + 4 * k}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--time", action="store_true",
                      help="the time model: one pinned core and one device per process")
  parser.add_argument("--worker", nargs=7, default=None)
  args = parser.parse_args()
  if args.worker:
    coordinator, processes, pid, n, sizes, out, mode = args.worker
    sizes = json.loads(sizes)
    if mode == "time":
      time_worker(coordinator, int(processes), int(pid), int(n), sizes, out)
    else:
      worker(coordinator, int(processes), int(pid), int(n), sizes["d"], sizes["k"], out)
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  if args.time:
    sizes, predict = (TIME_QUICK if args.quick else TIME), time_predictions
  else:
    sizes, predict = (QUICK if args.quick else FULL), predictions
  what = ("the time model: per-process extraction and k-means seconds on pinned cores"
          if args.time else "per-process extraction, spill and k-means costs")
  result = {"what": f"benchmarks/scaling.py: {what}", "sizes": sizes, "kmeans_iters": ITERS,
            "machine_cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "points": []}
  with tempfile.TemporaryDirectory() as out:
    for n in sizes["n_values"]:
      for processes in sizes["processes"]:
        for record in run_point(processes, n, sizes, out, args.time):
          record["predicted"] = predict(record)
          result["points"].append(record)
          print(json.dumps(record), flush=True)
        if args.json:  # after every point: a stopped run keeps what it measured
          with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
