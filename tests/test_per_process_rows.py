"""Two processes (localhost, 2 CPU devices each) extract and cluster only their own rows.

tests/rows_worker.py runs in each process: ``features.map_rows`` over N = 8192
synthetic images into D = 2048 features (64 MiB in all), then a hierarchical
k-means of those Rows, then the same with the features spilled to disk and
streamed (cluster/spill.py). What must hold:

* each process decodes exactly the images of its own devices' rows (N/P), and the
  two together decode every image exactly once;
* each process's addressable shards of the features are its devices' blocks of
  ``R = N/S`` rows, ``N·D·4/P`` bytes in all, and together cover every row once;
* memory: the peak RSS growth over the extraction is at least the process's share
  ``N·D·4/P`` (its rows are really held) and well below ``N·D·4``, so no process
  ever materialised an [N, D] array, host or device (measured on this CPU: 45-52
  MB against 32 MiB own and 64 MiB whole; asserted < 0.9·N·D·4, a whole [N, D]
  copy would add 64 MiB to its own 32). Spilled, the growth is a few batches
  (measured 2-3 MB; asserted < N·D·4/P / 4): no process keeps rows;
* each process writes only its own devices' files, and removes them;
* the streamed clustering of the spilled rows gives the labels of the in-memory one,
  and both processes get all N labels;
* the fast probe's classifier and the kNN vote work from each process's rows
  (evaluate/linear.py, evaluate/knn.py) and give what they give on the same
  features gathered to numpy (a small 1024 x 64 set, gathered for the comparison).

~80 s on 2 shared cores (two interpreters compiling the same programs).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

WORKER = os.path.join(REPO, "tests", "rows_worker.py")
N, D, PROCESSES, DEVICES = 8192, 2048, 2, 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  out = tmp_path_factory.mktemp("rows")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, f"127.0.0.1:{port}", str(PROCESSES),
                             str(i), str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
  # A guard against a hang, not a speed limit.
  for proc in procs:
    assert proc.wait(timeout=900) == 0, proc.communicate()[1][-3000:]
  return [json.load(open(out / f"process_{i}.json")) for i in range(PROCESSES)]


def test_each_process_decodes_only_its_own_rows_and_all_rows_once(reports):
  per_process = N // PROCESSES
  for i, report in enumerate(reports):
    assert report["decoded"] == list(range(i * per_process, (i + 1) * per_process))
  decoded = sorted(sum((r["decoded"] for r in reports), []))
  assert decoded == list(range(N))


def test_each_process_holds_only_its_devices_blocks_of_rows(reports):
  per_device = N // (PROCESSES * DEVICES)
  covered = []
  for report in reports:
    own = sorted(report["shards"])
    assert len(own) == DEVICES
    for start, stop, nbytes, rows in own:
      assert stop - start == rows == per_device and nbytes == rows * D * 4
    assert sum(nbytes for *_, nbytes, _ in own) == N * D * 4 // PROCESSES
    covered += [row for start, stop, *_ in own for row in range(start, stop)]
  assert sorted(covered) == list(range(N))


def test_no_process_ever_holds_all_rows(reports):
  whole, share = N * D * 4, N * D * 4 // PROCESSES
  for report in reports:
    assert share <= report["rss_growth"] < 0.9 * whole, report["rss_growth"]
    assert report["spill_rss_growth"] < share / 4, report["spill_rss_growth"]


def test_spilled_rows_are_written_by_their_process_and_cluster_the_same(reports):
  files = [f"process_{p}_shard_{p * DEVICES + d}.npy"
           for p in range(PROCESSES) for d in range(DEVICES)]
  for report in reports:
    assert report["files"] == files
    assert report["left"] == []
    super_labels, sub_labels = (np.asarray(v) for v in report["labels"])
    assert super_labels.shape == sub_labels.shape == (N,)
    assert len(np.unique(super_labels)) == 2 and len(np.unique(sub_labels)) == 2
    assert report["spilled_labels"] == report["labels"]
  assert reports[0]["labels"] == reports[1]["labels"]


def test_the_fast_probe_trains_on_each_process_rows_like_on_gathered_features(reports):
  """Its moments are float32 device sums there, float64 host sums on numpy: the same
  accuracies, the final loss within float tolerance (measured: identical)."""
  for report in reports:
    rows_top1, rows_train, rows_loss = report["probe_rows"]
    numpy_top1, numpy_train, numpy_loss = report["probe_numpy"]
    assert (rows_top1, rows_train) == (numpy_top1, numpy_train)
    assert rows_loss == pytest.approx(numpy_loss, rel=1e-4)
    assert rows_top1 > 0.4  # 4 classes the pixels tell apart: learnt, not chance
  assert reports[0]["probe_rows"] == reports[1]["probe_rows"]


def test_knn_votes_from_each_process_rows_like_from_gathered_features(reports):
  """Each device keeps its k best of its own rows; the merged candidates give the
  votes of one top-k over all rows (measured: every prediction the same)."""
  for report in reports:
    assert report["knn_rows"] == report["knn_numpy"]
    assert report["knn_top1"] > 0.4  # 4 classes, learnt, not chance
  assert reports[0]["knn_rows"] == reports[1]["knn_rows"]
