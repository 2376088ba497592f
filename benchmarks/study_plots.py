"""The study's figures: probe top-1 by layer per method, and the Fig. 3-like curves.

Figures are built on ``matplotlib.figure.Figure`` objects, never pyplot's global state,
so the report can draw them from any thread or notebook without leaking windows.
"""
from __future__ import annotations

from study_stats import DATA_NAMES, METHOD_NAMES, Stat, value_at

def _new_figure(width: float = 6.0, height: float = 3.8):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  return fig, fig.add_subplot()


def probe_by_layer(results: dict, section: str, data: str = "uncurated") -> dict:
  """``{method: {layer: Stat}}`` of the table's runs on ``data`` (``section``: probe or
  probe_paper), layers in depth order."""
  out = {}
  for name in METHOD_NAMES:
    runs = [r for r in results.get("table", {}).values()
            if r["study"]["method"] == name and r["study"]["data"] == data
            and value_at(r, section, "by_layer")]
    if runs:
      layers = list(runs[0][section]["by_layer"])
      out[name] = {layer: Stat(value_at(r, section, "by_layer", layer) for r in runs)
                   for layer in layers}
  return out


def plot_probe_by_layer(results: dict, section: str, path: str | None = None,
                        data: str = "uncurated"):
  """One line per method: mean top-1 by layer, sd as error bars. None without runs."""
  curves = probe_by_layer(results, section, data)
  if not curves:
    return None
  fig, ax = _new_figure(7.0 if section == "probe_paper" else 6.0)
  layers = list(max(curves.values(), key=len))
  for name, by_layer in curves.items():
    x = [layers.index(layer) for layer in by_layer if layer in layers]
    stats = [by_layer[layer] for layer in by_layer if layer in layers]
    ax.errorbar(x, [100 * s.mean for s in stats],
                yerr=[100 * s.std if s.n >= 2 else 0 for s in stats], marker="o",
                capsize=3, label=f"{METHOD_NAMES[name]} (n = {stats[0].n})")
  ax.set_xticks(range(len(layers)))
  ax.set_xticklabels(layers, rotation=30 if len(layers) > 6 else 0)
  protocol = "paper protocol, conv layers" if section == "probe_paper" else \
      "fast protocol, blocks"
  ax.set(xlabel="layer", ylabel="top-1 (%)", title=f"Linear probe by layer ({protocol}), "
                                                    f"{DATA_NAMES[data]} data")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  if path:
    fig.savefig(path)
  return fig


def curve_points(results: dict) -> dict[str, list[tuple[float, float, float | None]]]:
  """``{'k': [(k, fast top-1, paper top-1)], 'fraction': [(fraction, …)]}``, sorted.

  The whole-data point is the table's seed-0 DeeperCluster run on uncurated data (the
  same config as the curves, with all the images).
  """
  curves = results.get("curves", {})
  full = results.get("table", {}).get("uncurated__deepercluster__seed0")
  point = lambda r, x: (x, value_at(r, "probe", "top1"), value_at(r, "probe_paper", "top1"))
  by_k = [point(r, value_at(r, "clusters", "num_clusters")) for name, r in curves.items()
          if name.startswith("clusters_k")]
  by_data = []
  if full is not None:
    images = value_at(full, "run", "train_images")
    by_data = [point(r, value_at(r, "run", "train_images") / images)
               for name, r in curves.items() if name.startswith("data_")]
    by_data.append(point(full, 1.0))
  valid = lambda pts: sorted(p for p in pts if p[0] is not None and p[1] is not None)
  return {"k": valid(by_k), "fraction": valid(by_data)}


def plot_curves(results: dict, path: str | None = None):
  """Fig. 3-like: probe top-1 vs k (log axis) and vs the fraction of data. None if empty."""
  points = curve_points(results)
  if not any(points.values()):
    return None
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(10.0, 3.8), dpi=100)
  axes = fig.subplots(1, 2)
  for ax, (key, label) in zip(axes, (("k", "number of clusters k"),
                                     ("fraction", "fraction of the uncurated images"))):
    pts = points[key]
    if pts:
      x = [p[0] for p in pts]
      ax.plot(x, [100 * p[1] for p in pts], "o-", label="fast probe, last block")
      paper = [(p[0], p[2]) for p in pts if p[2] is not None]
      if paper:
        ax.plot([p[0] for p in paper], [100 * p[1] for p in paper], "s--",
                label="paper probe, best layer")
      ax.set_xscale("log", base=2)
      ax.set_xticks(x)
      ax.set_xticklabels([f"{v:g}" if key == "k" else f"{v:.2g}" for v in x])
      ax.legend(fontsize=8)
    ax.set(xlabel=label, ylabel="top-1 (%)", title=f"DeeperCluster, uncurated: vs {key}")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  if path:
    fig.savefig(path)
  return fig

