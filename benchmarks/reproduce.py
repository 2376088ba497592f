"""The paper's central comparison (Table 3, Fig. 3), at small scale, with seeds.

Methods, the same backbone and the same number of samples seen (24 epochs of N images):
random init (no training), RotNet, DeepCluster, DeeperCluster (from its RotNet warm-up,
as the paper), and a supervised bound (the same network trained on the classes of the
same images). Data: balanced Fashion-MNIST (the "curated" stand-in for ImageNet), its
long-tailed subset, and the uncurated set (long tail + near-duplicates + unlabelled
clutter). Every run is evaluated the same way: the fast probe on every block, the
paper's probe on every conv layer, kNN-20, the final clusters' NMI/ARI against NMI of a
k-means on raw pixels at the same k, and 1% / 10% fine-tuning against from scratch.

  python benchmarks/reproduce.py                  # the whole study (hours on 2 cores)
  python benchmarks/reproduce.py --part select    # only the hyper-parameter selection
  python benchmarks/reproduce.py --part table     # only the method × data × seed grid
  python benchmarks/reproduce.py --part curves    # only the Fig. 3-like curves
  python benchmarks/reproduce.py --part fidelity  # issue 12's changes, one at a time
  python benchmarks/reproduce.py --quick --out /tmp/study   # a tiny grid in minutes
  python benchmarks/reproduce.py --report         # docs/RESULTS.md + PNGs from what is done
  python benchmarks/reproduce.py --list           # the plan: which runs are done

Each run is its own workdir under ``--runs`` and its results are copied to
``--out/<part>/<name>.json`` (committed: benchmarks/results/study/); a run whose JSON
exists is skipped, so the study can be stopped and continued later. Hyper-parameters are
chosen on a validation split carved from the labelled *train* split
(``data.validation_size``), never on the test split; the choice is recorded in
``--out/select/choice.json`` and the grid uses it (``--choice NAME`` overrides it; the
table and the curves refuse to start without one). ``--only a,b`` runs only the runs
whose name contains ``a`` or ``b``. A failed run stops the study; its stderr is kept in
``<runs>/<part>/<name>/reproduce_stderr.txt``.

Quick mode (``--quick``) shrinks every run (512 training images, width 8, one cycle,
a few probe epochs) but keeps the grid's shape: the same methods, data, seeds and
candidates; the curves' k becomes 8 … 128 (512 images cannot hold 640 clusters).
"""
from __future__ import annotations

import argparse
import importlib.util
import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # name -> config file (None: evaluate the untrained network)
    "random": None, "rotnet": "configs/rotnet.py", "deepcluster": "configs/deepcluster.py",
    "deepercluster": "configs/default.py", "supervised": "configs/supervised.py"}
DATA = {"balanced": "fashion_mnist", "longtail": "fashion_mnist_longtail",
        "uncurated": "fashion_mnist_uncurated"}
SEEDS = (0, 1, 2)  # every uncurated run and every DeeperCluster run; the others: seed 0
EVALUATORS = "probe,probe_paper,knn,clusters,finetune"
EVAL_FLAGS = {"eval.evaluators": EVALUATORS, "eval.clusters_pixel_baseline": True}
NUM_SUPER_CLUSTERS = 4  # configs/default.py: k = 4 × k_sub clusters
DEFAULT_SUB_CLUSTERS = 10
VALIDATION_SIZE = 10_000
UNCURATED_IMAGES = 35_033  # fashion_mnist_uncurated at the default ratio and fractions


def sibling(name: str):
  """``benchmarks/<name>.py``, imported by its path (benchmarks/ is not a package)."""
  if name not in sys.modules:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


# The selection's candidates and rule (benchmarks/study_selection.py), used here and
# through this module by the report and the tests.
_selection = sibling("study_selection")
CANDIDATES, CANDIDATE_METHOD = _selection.CANDIDATES, _selection.CANDIDATE_METHOD
MIN_GAIN, is_diagnostic, choose = _selection.MIN_GAIN, _selection.is_diagnostic, _selection.choose


CURVE_SUB_CLUSTERS = (10, 20, 40, 80, 160)  # k = 4 × k_sub = 40 … 640
CURVE_FRACTIONS = (4, 2)  # 1/4 and 1/2 of the images (all: the table's seed-0 run)
# Quick mode: tiny data and network, a few steps per run. A run's own overrides (the
# candidate, the curve's k or data) are applied after these, so that they still differ.
QUICK = {"data.max_train_images": 512, "train.batch_size": 128,  # ≤ the curves' 1/4 of 512
         "model.width": 8, "model.feature_dim": 64,
         "clustering.pca_dim": 16, "method.num_sub_clusters": 4,
         "method.rotnet_warmup_epochs": 1, "train.num_cycles": 1, "train.epochs_per_cycle": 1,
         "eval.probe_max_train_images": 1000, "eval.probe_max_test_images": 500,
         "eval.probe_epochs": 2, "eval.paper_epochs": 1, "eval.paper_max_train_images": 1000,
         "eval.paper_max_test_images": 500, "eval.finetune_steps": 10,
         "eval.finetune_fractions": (0.01, 0.1), "eval.finetune_max_test_images": 500,
         "data.max_eval_images": 2000}
QUICK_CURVE_SUB_CLUSTERS = (2, 4, 8, 16, 32)  # k = 8 … 128 on 512 images


@dataclasses.dataclass
class Run:
  part: str
  name: str
  method: str
  data: str
  seed: int
  overrides: dict
  choice: str = ""  # the selected candidate the run's hyper-parameters come from

  def flags(self, quick: bool) -> list[str]:
    """``--config.<field>=<value>`` for ``deeper_jax.main`` (or ``--_evaluate_init``)."""
    values = {"data.name": DATA[self.data], "seed": self.seed, **EVAL_FLAGS}
    if self.method == "random":  # the run *is* the untrained network: probe it once
      values["eval.probe_random_init"] = False
    if quick:
      values.update(QUICK)
      if self.method in ("rotnet", "supervised"):  # their own k_sub (1, the classes)
        del values["method.num_sub_clusters"], values["method.rotnet_warmup_epochs"]
      if self.method == "deepcluster":
        values.update({"method.num_sub_clusters": 8, "method.rotnet_warmup_epochs": 0})
      if self.method == "supervised":
        values["train.epochs_per_cycle"] = 2
    values.update(self.overrides)
    return [f"--config.{k}={_flag(v)}" for k, v in values.items()]


def _flag(value) -> str:
  if isinstance(value, (tuple, list)):  # a list: a tuple read back from JSON
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def clusters_k(choice: dict, quick: bool) -> int:
  """k of the flat k-means that clusters RotNet's, random and supervised features.

  The chosen DeeperCluster's number of clusters, so that the table's NMIs compare
  clusterings of one size (DeepCluster keeps its own k; every row's pixel k-means
  baseline uses that row's k).
  """
  k_sub = choice.get("method.num_sub_clusters",
                     QUICK["method.num_sub_clusters"] if quick else DEFAULT_SUB_CLUSTERS)
  return NUM_SUPER_CLUSTERS * k_sub


def selection_runs() -> list[Run]:
  return [Run("select", name, CANDIDATE_METHOD.get(name, "deepercluster"), "uncurated", 0,
              {**overrides, "data.validation_size": VALIDATION_SIZE,
               "eval.evaluators": "probe,clusters"}, choice=name)
          for name, overrides in CANDIDATES.items()]


def table_runs(choice_name: str, choice: dict, quick: bool) -> list[Run]:
  """Every (data, method, seed) cell. DeeperCluster takes the whole choice; the other
  methods take its backbone (``model.*``), so that every row trains the same network."""
  backbone = {k: v for k, v in choice.items() if k.startswith("model.")}
  runs = []
  for data in DATA:
    for method in METHODS:
      seeds = SEEDS if data == "uncurated" or method == "deepercluster" else SEEDS[:1]
      for seed in seeds:
        overrides = ({**choice} if method == "deepercluster" else
                     {**backbone, "eval.clusters_k": clusters_k(choice, quick)})
        runs.append(Run("table", f"{data}__{method}__seed{seed}", method, data, seed,
                        overrides, choice=choice_name))
  return runs


def curve_runs(choice_name: str, choice: dict, quick: bool) -> list[Run]:
  runs = []
  for k_sub in QUICK_CURVE_SUB_CLUSTERS if quick else CURVE_SUB_CLUSTERS:
    runs.append(Run("curves", f"clusters_k{NUM_SUPER_CLUSTERS * k_sub}", "deepercluster",
                    "uncurated", 0, {**choice, "method.num_sub_clusters": k_sub},
                    choice=choice_name))
  num_images = QUICK["data.max_train_images"] if quick else UNCURATED_IMAGES
  for fraction in CURVE_FRACTIONS:
    runs.append(Run("curves", f"data_1of{fraction}", "deepercluster", "uncurated", 0,
                    {**choice, "data.max_train_images": num_images // fraction},
                    choice=choice_name))
  return runs


# Issue 12's fidelity changes, each reverted alone, on the data of the old default (the
# long-tailed set, seed 0, the default's budget of 24 epochs of N): each change's own
# effect. 'reference' has them all (today's defaults); 'before' reverts all of them.
FIDELITY = {
    "reference": {},
    "pad_crop": {"train.crop": "pad"},
    "global_mean_grad": {"method.sub_head_grad": "global_mean"},
    "no_warmup": {"method.rotnet_warmup_epochs": 0, "train.num_cycles": 8},
    "normal_init": {"method.head_init": "normal", "model.fc_init": "normal"},
    "recluster_every_8": {"method.rotnet_warmup_epochs": 0, "train.num_cycles": 3,
                          "train.epochs_per_cycle": 8},
    "before": {"train.crop": "pad", "method.sub_head_grad": "global_mean",
               "method.head_init": "normal", "model.fc_init": "normal",
               "method.rotnet_warmup_epochs": 0, "train.num_cycles": 3,
               "train.epochs_per_cycle": 8},
}


def fidelity_runs() -> list[Run]:
  return [Run("fidelity", name, "deepercluster", "longtail", 0,
              {**overrides, "eval.evaluators": "probe,clusters"})
          for name, overrides in FIDELITY.items()]


def plan(quick: bool, choice_name: str = "default", choice: dict | None = None) -> list[Run]:
  """Every run of the study, in the order they are run: select, table, curves."""
  choice = CANDIDATES[choice_name] if choice is None else choice
  return (selection_runs() + table_runs(choice_name, choice, quick)
          + curve_runs(choice_name, choice, quick))


def result_path(out: str, run: Run) -> str:
  return os.path.join(out, run.part, run.name + ".json")


def command(run: Run, workdir: str, quick: bool) -> list[str]:
  config = METHODS[run.method] or "configs/default.py"
  if METHODS[run.method] is None:  # the untrained network: evaluate without training
    return [sys.executable, os.path.abspath(__file__), "--_evaluate_init", "--config", config,
            "--workdir", workdir, *run.flags(quick)]
  return [sys.executable, "-m", "deeper_jax.main", "--config", config, "--workdir", workdir,
          *run.flags(quick)]


def run_one(run: Run, out: str, runs_root: str, quick: bool) -> dict | None:
  """Trains + evaluates one run (or only evaluates, for 'random'); None if done before.

  A run that fails raises, with the end of its stderr (all of it in
  ``<workdir>/reproduce_stderr.txt``); its JSON is not written.
  """
  target = result_path(out, run)
  if os.path.exists(target):
    return None
  workdir = os.path.join(runs_root, run.part, run.name)
  cmd = command(run, workdir, quick)
  print(f"[{time.strftime('%H:%M:%S')}] {run.part}/{run.name}", flush=True)
  start = time.time()
  # This checkout's package, whichever one pip installed (the script's own folder is
  # benchmarks/, so ``--_evaluate_init`` would not see the repository otherwise).
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, (REPO, os.environ.get("PYTHONPATH"))))}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "reproduce_stderr.txt"), "w") as f:
      f.write(proc.stderr)
    raise RuntimeError(f"{run.part}/{run.name} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-4000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results["study"] = {**dataclasses.asdict(run), "wall_seconds": time.time() - start,
                      "quick": quick, "workdir": workdir, "command": " ".join(cmd[1:])}
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with open(target + ".tmp", "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(target + ".tmp", target)
  return results


def evaluate_init(argv: list[str]) -> None:
  """``--_evaluate_init``: the evaluators on the untrained network of the config's seed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from deeper_jax import config_checks, evaluate, models  # pylint: disable=g-import-not-at-top
  from deeper_jax.data import registry  # pylint: disable=g-import-not-at-top
  from deeper_jax.runtime import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from deeper_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
  flags.DEFINE_string("workdir", None, "where results.json goes")
  flags.DEFINE_bool("_evaluate_init", True, "")
  flags.FLAGS(argv)
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  config_checks.check_config(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  datasets = registry.build_datasets(config.data)
  model = models.build_backbone(config.model)
  variables = state_lib.init_variables(model, config, datasets.train.image_shape[-1])
  ctx = evaluate.Context(model=model, variables=variables, config=config, datasets=datasets,
                         mesh=mesh_lib.make_mesh(), workdir=workdir)
  start = time.time()
  sections = evaluate.run(ctx, config.eval.evaluators)
  evaluate.write(workdir, {"run": {"train_images": len(datasets.train), "steps": 0,
                                   "wall_seconds": time.time() - start, "cycles": []},
                           **sections})


def run_all(runs: list[Run], args) -> int:
  """Runs those of ``runs`` that ``--only`` names; how many were done before."""
  skipped = 0
  for run in runs:
    if _wanted(run, args.only) and run_one(run, args.out, args.runs, args.quick) is None:
      skipped += 1
  return skipped


def select(args) -> tuple[tuple[str, dict] | None, int]:
  """Runs the selection; (the choice once every candidate is done, runs skipped)."""
  skipped = run_all(selection_runs(), args)
  selected = [_load(result_path(args.out, r)) for r in selection_runs()]
  if not all(selected):
    return None, skipped
  best, choice, scores = choose(selected)
  record = {"best": best, "overrides": choice, "validation_probe_top1": scores,
            "validation_size": VALIDATION_SIZE, "min_gain": MIN_GAIN,
            "diagnostics": sorted(filter(is_diagnostic, CANDIDATES))}
  path = os.path.join(args.out, "select", "choice.json")
  if _load(path) != json.loads(json.dumps(record)):  # a second pass writes nothing
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
    print(f"selected {best}: {choice} (validation probe {scores})", flush=True)
  return (best, choice), skipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("all", "select", "table", "curves", "fidelity"),
                      default="all")
  parser.add_argument("--quick", action="store_true", help="a tiny version of every run")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "study"))
  parser.add_argument("--runs", default=os.path.join(REPO, "runs", "study"))
  parser.add_argument("--docs", default=os.path.join(REPO, "docs"),
                      help="where --report writes RESULTS.md and its PNGs")
  parser.add_argument("--report", action="store_true", help="only tables and plots")
  parser.add_argument("--only", default="",
                      help="run only the runs whose name contains one of these "
                           "(comma-separated)")
  parser.add_argument("--choice", default="",
                      choices=("", *(n for n in CANDIDATES if n not in CANDIDATE_METHOD)),
                      help="use this candidate for the table and curves instead of the "
                           "selection's choice (select/choice.json)")
  parser.add_argument("--list", action="store_true",
                      help="print the plan (done / to do), run nothing")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.report:
    sibling("study_report").write_report(args.out, args.docs)
    return 0
  if args.list:
    for run in plan(args.quick):
      done = "done " if os.path.exists(result_path(args.out, run)) else "to do"
      print(f"{done}  {run.part}/{run.name}")
    return 0
  if args.part == "fidelity":  # issue 12's changes one at a time: needs no selection
    skipped = run_all(fidelity_runs(), args)
    print(f"{skipped} runs were done before (their JSON exists): skipped", flush=True)
    return 0
  parts = ("select", "table", "curves") if args.part == "all" else (args.part,)
  chosen, skipped = select(args) if "select" in parts else (_saved_choice(args.out), 0)
  if args.choice:
    chosen = args.choice, CANDIDATES[args.choice]
  runs = []
  if "table" in parts or "curves" in parts:
    if chosen is None:
      print("reproduce.py: error: the table and the curves use the selection's choice: run "
            "--part select to the end first, or pass --choice NAME.", file=sys.stderr)
      return 2
    if "table" in parts:
      runs += table_runs(*chosen, args.quick)
    if "curves" in parts:
      runs += curve_runs(*chosen, args.quick)
  skipped += run_all(runs, args)
  if skipped:
    print(f"{skipped} runs were done before (their JSON exists): skipped", flush=True)
  return 0


def _wanted(run: Run, only: str) -> bool:
  return not only or any(part and part in run.name for part in only.split(","))


def _saved_choice(out: str) -> tuple[str, dict] | None:
  saved = _load(os.path.join(out, "select", "choice.json"))
  return None if saved is None else (saved["best"], CANDIDATES[saved["best"]])


def _load(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


if __name__ == "__main__":
  if "--_evaluate_init" in sys.argv:
    evaluate_init(sys.argv)
  else:
    sys.exit(main())
