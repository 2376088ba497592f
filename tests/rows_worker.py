"""One process of tests/test_per_process_rows.py: extract, then cluster, its own rows.

  python tests/rows_worker.py <coordinator> <num_processes> <process_id> <out_dir>

Features are a fixed random projection of each image's pixels (``D = 2048``, large
enough that ``N·D`` and ``N·D/P`` differ by tens of MB), extracted with
``features.map_rows`` from a source that records which images it decoded. Writes
``<out_dir>/process_<id>.json``: the images decoded, the rows and bytes of this
process's feature shards, the RSS growth over the extraction, the peak of numpy
(host) allocations over extraction + PCA + k-means, and the labels of the in-memory
and of the spilled (streamed) clustering.
"""
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

N, D, SIDE = 8192, 2048, 8


class CountingSource:
  """Synthetic 8x8 images, a few clusters of them; records every index it decodes."""

  image_shape = (SIDE, SIDE, 1)

  def __init__(self, n: int):
    self.n, self.decoded = n, []
    rng = np.random.default_rng(0)
    self.prototypes = rng.integers(0, 256, (2, SIDE, SIDE, 1))

  def __len__(self):
    return self.n

  def images(self, indices):
    indices = np.asarray(indices)
    self.decoded.extend(int(i) for i in indices)
    noise = (indices[:, None, None, None] * 2654435761 + np.arange(SIDE * SIDE).reshape(
        1, SIDE, SIDE, 1) * 40503) % 61
    return ((self.prototypes[indices % 2] + noise) % 256).astype(np.uint8)


def rss_bytes(field: str = "VmRSS") -> int:
  """Resident memory now (``VmRSS``) or at its peak since the last reset (``VmHWM``)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
  """Sets VmHWM to the current RSS (Linux >= 4.0)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def tick(what: str, last=[time.time()]) -> None:  # pylint: disable=dangerous-default-value
  print(f"{what}: {time.time() - last[0]:.1f} s", file=sys.stderr)
  last[0] = time.time()


def main(coordinator: str, num_processes: int, process_id: int, out_dir: str):
  jax.distributed.initialize(coordinator, num_processes, process_id)
  from deeper_jax.cluster import hierarchical
  from deeper_jax.extract import features
  from deeper_jax.runtime.mesh import make_mesh

  mesh = make_mesh()
  projection = jnp.asarray(np.random.default_rng(1).normal(size=(SIDE * SIDE, D)), jnp.float32)
  fn = jax.jit(lambda images: {"f": (images.reshape(images.shape[0], -1) / 255.0) @ projection})
  extract = lambda source, n: features.map_rows(
      fn, source, np.arange(n), batch_size=512, out_dims={"f": D}, mesh=mesh)["f"]
  jax.block_until_ready(extract(CountingSource(64), 64).array)  # compiled before measuring

  source = CountingSource(N)
  reset_peak()
  before = rss_bytes()
  rows = extract(source, N)
  jax.block_until_ready(rows.array)
  grown = rss_bytes("VmHWM") - before
  shards = [(s.index[0].start, s.index[0].stop, int(s.data.nbytes), s.data.shape[0])
            for s in rows.array.addressable_shards]
  tick("extract")
  memory = hierarchical.hierarchical_kmeans(rows, 2, 2, num_iters=2, seed=0)
  tick("cluster")
  del rows  # the spilled path starts from nothing held

  reset_peak()
  before = rss_bytes()
  directory = os.path.join(out_dir, "features")
  on_disk = features.spill_rows(fn, CountingSource(N), np.arange(N), directory, output="f",
                                batch_size=512, out_dims={"f": D}, mesh=mesh)
  spill_grown = rss_bytes("VmHWM") - before
  written = sorted(os.listdir(directory))
  tick("spill")
  streamed = hierarchical.hierarchical_kmeans(on_disk, 2, 2, num_iters=2, seed=0)
  tick("streamed")
  on_disk.remove()
  left = glob.glob(os.path.join(directory, f"process_{process_id}_*"))

  # The fast probe's classifier on Rows (each process its own rows) and on the
  # same features gathered to numpy (small: 1024 x 64), which one process would use.
  from deeper_jax.evaluate import linear
  small = jax.jit(lambda images: {"f": (images.reshape(images.shape[0], -1) / 255.0)
                                  @ projection[:, :64]})
  probe_rows = [features.map_rows(small, CountingSource(n), np.arange(n), batch_size=256,
                                  out_dims={"f": 64}, mesh=mesh)["f"] for n in (1024, 512)]
  # Classes the pixels tell: the prototype, and whether the first pixel's noise is high.
  labels = [(i % 2) * 2 + ((i * 2654435761) % 61 > 30) for i in (np.arange(1024), np.arange(512))]
  kwargs = dict(num_classes=4, epochs=3, batch_size=64, lr=1.0, seed=0)
  on_rows = linear.train_linear_probe(probe_rows[0], labels[0], probe_rows[1], labels[1],
                                      **kwargs)
  gathered = linear.train_linear_probe(probe_rows[0].to_numpy(), labels[0],
                                       probe_rows[1].to_numpy(), labels[1], **kwargs)
  from deeper_jax.evaluate import knn
  queries = probe_rows[1].to_numpy()
  knn_rows = knn.knn_predict(probe_rows[0], labels[0], queries, k=20, num_classes=4,
                             chunk_size=128)
  knn_numpy = knn.knn_predict(probe_rows[0].to_numpy(), labels[0], queries, k=20,
                              num_classes=4, chunk_size=128)
  tick("probe, knn")

  result = {
      "knn_rows": knn_rows.tolist(), "knn_numpy": knn_numpy.tolist(),
      "knn_top1": float((knn_rows == labels[1]).mean()),
      "probe_rows": [on_rows.test_top1, on_rows.train_top1, on_rows.final_loss],
      "probe_numpy": [gathered.test_top1, gathered.train_top1, gathered.final_loss],
      "decoded": sorted(source.decoded), "shards": shards, "rss_growth": grown,
      "spill_rss_growth": spill_grown, "files": written,
      "labels": [memory.super_labels.tolist(), memory.sub_labels.tolist()],
      "spilled_labels": [streamed.super_labels.tolist(), streamed.sub_labels.tolist()],
      "left": left,
      "devices": [d.id for d in mesh.devices.flat],
      "local_devices": [d.id for d in mesh.local_devices],
  }
  with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
