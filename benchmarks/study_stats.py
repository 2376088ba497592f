"""The study's numbers: its runs' JSON read back, statistics over seeds, the targets.

Every number and every verdict of the report (study_report.py) is computed here from the
runs' JSON (``<out>/<part>/<name>.json``), never typed by hand: a claim such as
"DeeperCluster beats RotNet on uncurated data" is only as good as the figures beside it,
and more runs must be able to turn it from "holds" into "does not hold".

Statistics: the mean and the sample standard deviation (``ddof = 1``) over seeds;
the standard deviation of a gap between two methods' means is that of a difference of
independent means, ``sqrt(s_a² / n_a + s_b² / n_b)`` (it needs two seeds of each).
"""
from __future__ import annotations

import collections
import glob
import json
import math
import os
from typing import Callable

import numpy as np

METHOD_NAMES = {"random": "Random init", "rotnet": "RotNet", "deepcluster": "DeepCluster",
                "deepercluster": "DeeperCluster", "supervised": "Supervised"}
DATA_NAMES = {"balanced": "balanced", "longtail": "long-tail", "uncurated": "uncurated"}
MISSING = "–"

# The targets, on uncurated data.
TARGET_PROBE = 0.90          # DeeperCluster's fast probe top-1
TARGET_MARGIN = 0.01         # its lead over each baseline, and > 2 sd of the gap
TARGET_SIGMAS = 2.0
TARGET_NMI = 0.60            # NMI of its final clusters with the classes
TARGET_CURATION_GAP = 0.01   # |uncurated − balanced| probe top-1
BASELINES = ("rotnet", "deepcluster", "random")


# --- reading --------------------------------------------------------------------------

def load_results(out_dir: str) -> dict[str, dict[str, dict]]:
  """``{part: {name: results.json + study}}`` of every finished run under ``out_dir``."""
  results = collections.defaultdict(dict)
  for path in sorted(glob.glob(os.path.join(out_dir, "*", "*.json"))):
    with open(path) as f:
      run = json.load(f)
    if "study" in run:  # select/choice.json is not a run
      results[run["study"]["part"]][run["study"]["name"]] = run
  return dict(results)


def load_choice(out_dir: str) -> dict | None:
  path = os.path.join(out_dir, "select", "choice.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_quick(results: dict) -> bool:
  """Whether the runs are of ``--quick`` (its plan differs: the curves' k)."""
  return any(r["study"].get("quick") for part in results.values() for r in part.values())


def progress(results: dict, plan: list) -> dict[str, tuple[int, int]]:
  """``{part: (done, planned)}`` over the plan, and ``'all'``."""
  counts = {}
  for run in plan:
    done, total = counts.get(run.part, (0, 0))
    counts[run.part] = (done + (run.name in results.get(run.part, {})), total + 1)
  counts["all"] = tuple(map(sum, zip(*counts.values()))) if counts else (0, 0)
  return counts


# --- statistics -----------------------------------------------------------------------

class Stat:
  """Mean and sample standard deviation of one cell's values over seeds."""

  def __init__(self, values):
    self.values = [float(v) for v in values if v is not None]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.values else math.nan

  @property
  def std(self) -> float:
    return float(np.std(self.values, ddof=1)) if self.n >= 2 else math.nan

  def format(self, scale: float = 100.0, digits: int = 1) -> str:
    if not self.n:
      return MISSING
    text = f"{scale * self.mean:.{digits}f}"
    return text + (f" ± {scale * self.std:.{digits}f}" if self.n >= 2 else "")


def gap(a: Stat, b: Stat) -> tuple[float, float]:
  """``mean_a − mean_b`` and its sd, ``sqrt(s_a²/n_a + s_b²/n_b)`` (nan under 2 seeds)."""
  if a.n < 2 or b.n < 2:
    return a.mean - b.mean, math.nan
  return a.mean - b.mean, math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def value_at(run: dict, *keys):
  """``run[k0][k1]…``, or None where a section or key is missing (an evaluator skipped)."""
  value = run
  for key in keys:
    if not isinstance(value, dict) or key not in value:
      return None
    value = value[key]
  return value


# The table's metrics: name -> (column title, value of one run, scale, digits).
Metric = tuple[str, Callable[[dict], float | None], float, int]
METRICS: dict[str, Metric] = {
    "probe": ("Probe top-1 (fast, last block)", lambda r: value_at(r, "probe", "top1"), 100, 1),
    "probe_paper": ("Probe top-1 (paper, best layer)",
                    lambda r: value_at(r, "probe_paper", "top1"), 100, 1),
    "knn": ("kNN-20 top-1", lambda r: value_at(r, "knn", "top1"), 100, 1),
    "nmi": ("NMI", lambda r: value_at(r, "clusters", "nmi_labels"), 1, 3),
    "pixel_nmi": ("NMI pixel k-means", lambda r: value_at(r, "clusters", "pixel_kmeans_nmi_labels"),
                  1, 3),
    "ari": ("ARI", lambda r: value_at(r, "clusters", "ari_labels"), 1, 3),
    "ft1_pretrained": ("FT 1% pretrained",
                       lambda r: value_at(r, "finetune", "top1", "1%", "pretrained"), 100, 1),
    "ft1_scratch": ("FT 1% scratch", lambda r: value_at(r, "finetune", "top1", "1%", "scratch"),
                    100, 1),
    "ft10_pretrained": ("FT 10% pretrained",
                        lambda r: value_at(r, "finetune", "top1", "10%", "pretrained"), 100, 1),
    "ft10_scratch": ("FT 10% scratch",
                     lambda r: value_at(r, "finetune", "top1", "10%", "scratch"), 100, 1),
    "wall": ("Wall time / run (min)", lambda r: value_at(r, "study", "wall_seconds"), 1 / 60, 1),
}


def table_cells(results: dict, plan: list) -> list[dict]:
  """One row per (method, data) of the plan's table: runs done, planned, a Stat per metric."""
  rows = {}
  for run in plan:
    if run.part != "table":
      continue
    row = rows.setdefault((run.method, run.data), {"method": run.method, "data": run.data,
                                                   "planned": 0, "runs": []})
    row["planned"] += 1
    done = results.get("table", {}).get(run.name)
    if done is not None:
      row["runs"].append(done)
  for row in rows.values():
    row["stats"] = {name: Stat(get(r) for r in row["runs"])
                    for name, (_, get, _, _) in METRICS.items()}
    ks = sorted({value_at(r, "clusters", "num_clusters") for r in row["runs"]} - {None})
    row["k"] = "/".join(str(k) for k in ks) or MISSING
    best = collections.Counter(value_at(r, "probe_paper", "best_layer") for r in row["runs"])
    best.pop(None, None)
    row["paper_layer"] = best.most_common(1)[0][0] if best else ""
  return list(rows.values())


def stat(rows: list[dict], method: str, data: str, metric: str) -> Stat:
  for row in rows:
    if row["method"] == method and row["data"] == data:
      return row["stats"][metric]
  return Stat([])


# --- the targets ----------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
  return {True: "holds", False: "does not hold", None: "not known yet"}[ok]


def _pct(stat_: Stat) -> str:
  return f"{stat_.format()} % (n = {stat_.n})" if stat_.n else "no runs yet"


def targets(rows: list[dict]) -> list[dict]:
  """The issue's targets on uncurated data, each ``{'target', 'holds', 'figures'}``.

  ``holds`` is True / False, or None when the runs it needs are not done.
  """
  dc = stat(rows, "deepercluster", "uncurated", "probe")
  out = [{"target": f"DeeperCluster's probe top-1 on uncurated data ≥ {100 * TARGET_PROBE:g} %",
          "holds": dc.mean >= TARGET_PROBE if dc.n else None, "figures": _pct(dc)}]
  for name in BASELINES:
    other = stat(rows, name, "uncurated", "probe")
    diff, sd = gap(dc, other) if dc.n and other.n else (math.nan, math.nan)
    ok = None if math.isnan(sd) else bool(diff >= TARGET_MARGIN and diff > TARGET_SIGMAS * sd)
    figures = (f"DeeperCluster {_pct(dc)}, {METHOD_NAMES[name]} {_pct(other)}; gap "
               + (f"{100 * diff:+.2f} points" if not math.isnan(diff) else MISSING)
               + (f", sd of the gap {100 * sd:.2f}, {TARGET_SIGMAS:g} sd = "
                  f"{100 * TARGET_SIGMAS * sd:.2f}" if not math.isnan(sd)
                  else " (its sd needs ≥ 2 seeds of each)"))
    out.append({"target": f"ahead of {METHOD_NAMES[name]} by ≥ {100 * TARGET_MARGIN:g} point "
                          f"and by > {TARGET_SIGMAS:g} sd of the gap",
                "holds": ok, "figures": figures})
  nmi = stat(rows, "deepercluster", "uncurated", "nmi")
  pixels = stat(rows, "deepercluster", "uncurated", "pixel_nmi")
  out.append({"target": f"NMI of its final clusters ≥ {TARGET_NMI:.2f}",
              "holds": nmi.mean >= TARGET_NMI if nmi.n else None,
              "figures": f"NMI {nmi.format(1, 3)} (n = {nmi.n})"})
  out.append({"target": "NMI of its clusters above k-means on pixels at the same k",
              "holds": nmi.mean > pixels.mean if nmi.n and pixels.n else None,
              "figures": f"NMI {nmi.format(1, 3)} vs pixel k-means {pixels.format(1, 3)}"})
  balanced = stat(rows, "deepercluster", "balanced", "probe")
  diff = dc.mean - balanced.mean
  out.append({"target": f"uncurated vs balanced probe top-1 within "
                        f"{100 * TARGET_CURATION_GAP:g} point (DeeperCluster)",
              "holds": abs(diff) <= TARGET_CURATION_GAP if dc.n and balanced.n else None,
              "figures": f"uncurated {_pct(dc)}, balanced {_pct(balanced)}; difference "
                         + (f"{100 * diff:+.2f} points" if dc.n and balanced.n else MISSING)})
  return out

