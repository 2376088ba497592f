"""Features split by rows over the devices (deeper_jax.cluster.layout.Rows): moving rows
between devices changes no bit, and every consumer gives on Rows what it gives on numpy.

These are the pieces that let many processes cluster without any of them holding all
rows (tests/test_multiprocess.py runs them across two processes).
"""
import numpy as np
import pytest

from conftest import run_with_devices
from deeper_jax.cluster import layout
from deeper_jax.cluster.hierarchical import hierarchical_kmeans
from deeper_jax.cluster.kmeans import kmeans
from deeper_jax.data import load_fashion_mnist
from deeper_jax.reduce import pca as pca_lib
from deeper_jax.runtime.mesh import make_mesh


def pooled_pixels(n: int) -> np.ndarray:
  """First n real training images, 4x4-average-pooled to 49 dims."""
  images = load_fashion_mnist("train").images(np.arange(n))
  return (images.reshape(n, 7, 4, 7, 4).astype(np.float32).mean((2, 4)) / 255.0).reshape(n, 49)


def test_rows_hold_the_matrix_in_blocks_with_zero_padding():
  x = pooled_pixels(101)
  rows = layout.as_rows(x, make_mesh())
  assert rows.shape == (101, 49) and len(rows) == 101
  assert rows.array.shape[0] == layout.plan_rows(101, rows.mesh.size, 1).padded_rows
  np.testing.assert_array_equal(rows.to_numpy(), x)
  assert not np.asarray(rows.array)[101:].any()


def test_gather_rows_moves_exact_bits_in_pieces_over_eight_devices():
  out = run_with_devices("""
    import json, numpy as np
    from deeper_jax.cluster import layout
    rng = np.random.default_rng(0)
    x = rng.standard_normal((203, 5)).astype(np.float32)
    x[3, 1], x[7, 2] = -0.0, np.float32(1e-42)  # a negative zero and a denormal survive
    layout.GATHER_ELEMENTS = 8 * 5 * 3  # pieces of 3 rows: many steps, the last overlapping
    rows = layout.as_rows(x)
    ids = rng.permutation(203)[:150]
    moved = layout.gather_rows(rows, ids, 160)
    got = moved.to_numpy()
    print(json.dumps({
        'devices': rows.mesh.size, 'rows': moved.num_rows,
        'same_bits': bool((got[:150].view(np.int32) == x[ids].view(np.int32)).all()),
        'zeros_after': bool(not np.asarray(moved.array)[150:].view(np.int32).any()),
        'picked': bool((layout.rows_to_hosts(rows, ids[:7]).view(np.int32)
                        == x[ids[:7]].view(np.int32)).all())}))
  """, 8)
  assert out == {"devices": 8, "rows": 160, "same_bits": True, "zeros_after": True,
                 "picked": True}


def test_gather_rows_refuses_fewer_rows_than_ids():
  rows = layout.as_rows(pooled_pixels(10), make_mesh())
  with pytest.raises(ValueError, match="num_rows=3"):
    layout.gather_rows(rows, np.arange(5), 3)


def test_pca_and_kmeans_on_rows_give_the_numpy_results_bit_for_bit():
  x = pooled_pixels(1500)
  rows = layout.as_rows(x, make_mesh())
  for sample in (None, 900):
    want = pca_lib.fit_pca_whitening(x, 16, sample_size=sample, seed=2)
    got = pca_lib.fit_pca_whitening(rows, 16, sample_size=sample, seed=2)
    np.testing.assert_array_equal(got.projection, want.projection)
    np.testing.assert_array_equal(got.mean, want.mean)
  reduced = pca_lib.apply_pca_whitening(want, rows, chunk_size=300)
  assert isinstance(reduced, layout.Rows) and reduced.shape == (1500, 16)
  np.testing.assert_array_equal(reduced.to_numpy(),
                                pca_lib.apply_pca_whitening(want, x, chunk_size=300))
  for init in ("random", "kmeans++"):
    a, b = kmeans(reduced.to_numpy(), 12, seed=3, init=init), kmeans(reduced, 12, seed=3, init=init)
    np.testing.assert_array_equal(b.assignments, a.assignments)
    np.testing.assert_array_equal(b.centroids, a.centroids)
    assert b.objective == a.objective
  a = hierarchical_kmeans(reduced.to_numpy(), 3, 5, seed=1)
  b = hierarchical_kmeans(reduced, 3, 5, seed=1)
  np.testing.assert_array_equal(b.super_labels, a.super_labels)
  np.testing.assert_array_equal(b.sub_labels, a.sub_labels)
  assert (b.super_objective, b.sub_objective) == (a.super_objective, a.sub_objective)


def test_each_device_extracts_its_own_rows_and_gets_the_batched_features():
  """map_rows hands device s only rows of its block [s*R, (s+1)*R), and the features
  equal those of plain batches bit for bit (a row's features do not depend on the
  rest of its batch), so clustering on Rows is what clustering on numpy was."""
  out = run_with_devices("""
    import json, numpy as np
    import configs.tiny
    from deeper_jax.data import load_fashion_mnist
    from deeper_jax.extract import features
    from deeper_jax.models import build_backbone
    from deeper_jax.runtime.mesh import make_mesh
    from deeper_jax.train import state as state_lib

    class Recording:
      def __init__(self, source):
        self.source, self.calls = source, []
        self.image_shape = source.image_shape
      def __len__(self):
        return len(self.source)
      def images(self, idx):
        self.calls.append(np.asarray(idx).tolist())
        return self.source.images(idx)

    config = configs.tiny.get_config()
    module = build_backbone(config.model)
    variables = state_lib.init_variables(module, config, 1)
    source = Recording(load_fashion_mnist('test'))
    indices = np.arange(1000, 1203)  # 203 rows: R = 51, the last device has 50
    rows = features.extract_rows(module, variables, source, indices=indices, batch_size=64,
                                 layers='conv2', mesh=make_mesh())
    calls = list(source.calls)
    batched = features.extract_features(module, variables, source, indices=indices,
                                        batch_size=64, layers='conv2')
    per_shard = rows['features'].array.shape[0] // 4
    blocks = [sorted({(i - 1000) // per_shard for i in call}) for call in calls]
    print(json.dumps({
        'one_block_per_read': all(len(b) == 1 for b in blocks),
        'every_row_read': sorted({i for c in calls for i in c}) == indices.tolist(),
        'same': {k: bool(np.array_equal(rows[k].to_numpy(), batched[k])) for k in batched}}))
  """, 4)
  assert out == {"one_block_per_read": True, "every_row_read": True,
                 "same": {"features": True, "conv2": True}}
