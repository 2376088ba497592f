"""How deeper_jax k-means time per Lloyd iteration grows with N and with k.

    python benchmarks/kmeans_scaling.py --json benchmarks/results/kmeans_scaling_$(date +%F).json
    python benchmarks/kmeans_scaling.py --quick      # small sizes, a smoke run

Two sweeps on the same kind of features as kmeans_vs_peers.py (Gaussian random
projections of real Fashion-MNIST pixels, L2-normalised; rows past 70k are shifted
copies): N in {25k, 50k, 100k, 200k, 400k} at fixed d and k, and k in {100, 1k, 10k}
at fixed N and d. Each point: compile with a 1-iteration run, then time 10
iterations + the final assignment (11 passes) and divide by 11; the best of
``--repeats`` runs is kept (the machine is shared). The log-log slope fitted by
least squares is the empirical exponent: Lloyd's algorithm is O(N k d) per
iteration, so both should be near 1 once fixed costs are amortised.

deeper_jax's k-means (``deeper_jax.cluster.kmeans``: pruned Lloyd, XLA float32 dot
scores) runs on XLA:CPU unless ``JAX_PLATFORMS`` is set, like kmeans_vs_peers.py.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before anything imports jax

# deeper_jax comes from the installed package (pip install -e .); kmeans_vs_peers from
# this script's folder, which python puts first on the path.
from kmeans_vs_peers import ITERS, initial_centroids, make_features  # noqa: E402

FULL = {"n_values": (25_000, 50_000, 100_000, 200_000, 400_000), "k_values": (100, 1000, 10_000),
        "d": 128, "fixed_k": 1000, "fixed_n": 100_000}
QUICK = {"n_values": (5_000, 10_000, 20_000, 40_000), "k_values": (10, 100, 1000),
         "d": 64, "fixed_k": 100, "fixed_n": 20_000}


def seconds_per_iter(x: np.ndarray, k: int, repeats: int) -> float:
  from deeper_jax.cluster.kmeans import kmeans
  c0 = initial_centroids(x, k)
  kmeans(x, k, num_iters=1, init_centroids=c0)  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    kmeans(x, k, num_iters=ITERS, init_centroids=c0)
    best = min(best, (time.perf_counter() - start) / (ITERS + 1))
  return best


def exponent(sizes, seconds) -> float:
  return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  import jax
  cfg = QUICK if args.quick else FULL
  d = cfg["d"]
  features = make_features(max(max(cfg["n_values"]), cfg["fixed_n"]), d)

  by_n = []
  for n in cfg["n_values"]:
    sec = seconds_per_iter(features[:n], cfg["fixed_k"], args.repeats)
    by_n.append({"N": n, "d": d, "k": cfg["fixed_k"], "sec_per_iter": sec})
    print(f"N={n:>7} d={d} k={cfg['fixed_k']:>5}: {sec:.4f} s/iter", flush=True)
  by_k = []
  for k in cfg["k_values"]:
    sec = seconds_per_iter(features[:cfg["fixed_n"]], k, args.repeats)
    by_k.append({"N": cfg["fixed_n"], "d": d, "k": k, "sec_per_iter": sec})
    print(f"N={cfg['fixed_n']:>7} d={d} k={k:>5}: {sec:.4f} s/iter", flush=True)

  result = {
      "by_n": by_n, "by_k": by_k,
      "exponent_n": exponent([r["N"] for r in by_n], [r["sec_per_iter"] for r in by_n]),
      "exponent_k": exponent([r["k"] for r in by_k], [r["sec_per_iter"] for r in by_k]),
      "quick": args.quick, "cpus": os.cpu_count(), "backend": jax.default_backend(),
      "jax": jax.__version__, "deeper_jax": "deeper_jax.cluster.kmeans, XLA float32 dot scores",
  }
  print(f"time ~ N^{result['exponent_n']:.2f} (k={cfg['fixed_k']}), "
        f"time ~ k^{result['exponent_k']:.2f} (N={cfg['fixed_n']})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
