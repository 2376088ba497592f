"""The evaluators by name (deeper_jax/evaluate/): kNN, clusters, cluster grids, what
happens without labels, and how results reach ``<workdir>/results.json``.

The probes are in test_probe.py and test_probe_paper.py, fine-tuning in
test_finetune.py.
"""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from deeper_jax import evaluate
from deeper_jax.evaluate import cluster_grid, clusters, knn
from eval_helpers import fashion_datasets, make_context, pixels, png_shows_data

LABELLED_EVALUATORS = ("probe", "probe_paper", "knn", "finetune")




class PartlyLabelled:
  """Real images of which some carry no label (-1), like the clutter of an uncurated
  set (an ArraySource refuses negative labels, so this wraps one)."""

  def __init__(self, base, labels):
    self.base, self.labels = base, np.asarray(labels)
    self.image_shape, self.num_classes = base.image_shape, base.num_classes

  def __len__(self):
    return len(self.base)

  def images(self, indices):
    return self.base.images(indices)


@pytest.fixture(scope="module")
def datasets():
  return fashion_datasets()


# --- kNN ---------------------------------------------------------------------------


def test_knn_on_real_fashion_mnist_pixels_is_sensible(fmnist_train, fmnist_test):
  xtr, xte = pixels(fmnist_train, 10_000), pixels(fmnist_test, 2_000)
  ytr, yte = fmnist_train.labels[:10_000], fmnist_test.labels[:2_000]
  weighted = knn.knn_accuracy(xtr, ytr, xte, yte, k=20)
  majority = knn.knn_accuracy(xtr, ytr, xte, yte, k=20, weighting="majority")
  # About 84% with all 60k training images; a 10k bank loses a little.
  assert 0.70 < weighted < 0.95
  assert 0.70 < majority < 0.95
  shuffled = knn.knn_accuracy(xtr, np.random.default_rng(0).permutation(ytr), xte, yte)
  assert shuffled < 0.2


def test_knn_is_cosine_and_chunking_changes_nothing():
  rng = np.random.default_rng(0)
  centres = np.eye(4, 16, dtype=np.float32) * 10
  labels = np.repeat(np.arange(4), 30)
  train = centres[labels] + rng.normal(size=(120, 16)).astype(np.float32)
  test = centres[np.arange(4)] * 0.01  # tiny norm: only the direction counts
  np.testing.assert_array_equal(knn.knn_predict(train, labels, test, k=5), np.arange(4))
  queries = train[::3] + 0.5 * rng.normal(size=(40, 16)).astype(np.float32)
  np.testing.assert_array_equal(knn.knn_predict(train, labels, queries, chunk_size=7),
                                knn.knn_predict(train, labels, queries, chunk_size=512))


def test_knn_weighted_vote_lets_one_close_neighbour_beat_two_far_ones():
  train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
  labels = np.array([0, 1, 1])
  query = np.array([[1.0, 0.05]], np.float32)
  assert knn.knn_predict(train, labels, query, k=3)[0] == 0
  assert knn.knn_predict(train, labels, query, k=3, weighting="majority")[0] == 1


# --- cluster metrics ------------------------------------------------------------------

TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2])
PRED = np.array([5, 5, 7, 7, 7, 7, 9, 5])


def test_purity_by_hand():
  # Cluster 5 holds classes {0, 0, 2}, 7 holds {0, 1, 1, 1}, 9 holds {2}.
  assert clusters.purity(TRUE, PRED) == pytest.approx((2 + 3 + 1) / 8)
  assert clusters.purity(TRUE, TRUE) == 1.0
  assert clusters.purity(TRUE, np.zeros(8)) == pytest.approx(3 / 8)
  assert clusters.purity(TRUE, PRED + 100) == clusters.purity(TRUE, PRED)


def test_agreement_leaves_unlabelled_images_out():
  truth = np.concatenate([TRUE, [-1, -1]])
  pred = np.concatenate([PRED, [9, 9]])
  got = clusters.agreement(truth, pred)
  assert got["labelled_images"] == 8
  # Counting the two -1 as a class would make cluster 9 vote for -1: purity 0.7.
  assert got["purity_labels"] == pytest.approx(6 / 8)
  assert got["nmi_labels"] == pytest.approx(skm.normalized_mutual_info_score(TRUE, PRED))
  assert got["ari_labels"] == pytest.approx(skm.adjusted_rand_score(TRUE, PRED))
  assert got["nmi_labels"] != pytest.approx(skm.normalized_mutual_info_score(truth, pred))


# --- the clusters evaluator -------------------------------------------------------------


def hand_purity(truth, pred):
  return sum(np.bincount(truth[pred == c]).max() for c in np.unique(pred)) / len(truth)


def test_clusters_of_deepercluster_against_labels_skip_unlabelled_images(datasets, tmp_path):
  train = datasets.train
  truth = np.asarray(train.labels).copy()
  truth[::5] = -1  # a fifth of the images has no label
  ctx = make_context(tmp_path, datasets._replace(train=PartlyLabelled(train, truth)),
                     **{"eval.clusters_pixel_baseline": True})
  result = clusters.evaluate(ctx)
  method = ctx.config.method
  assert result["num_clusters"] == method.num_super_clusters * method.num_sub_clusters == 8
  assert result["how"].startswith("hierarchical k-means")
  labels = ctx.cache["final_labels"]
  assert labels.shape == (len(train),) and labels.min() >= 0 and labels.max() < 8
  keep = truth >= 0
  assert result["labelled_images"] == keep.sum() == 800
  assert result["nmi_labels"] == pytest.approx(
      skm.normalized_mutual_info_score(truth[keep], labels[keep]))
  assert result["ari_labels"] == pytest.approx(skm.adjusted_rand_score(truth[keep], labels[keep]))
  assert result["purity_labels"] == pytest.approx(hand_purity(truth[keep], labels[keep]))
  # Random-init features already group Fashion-MNIST classes somewhat.
  assert 0.05 < result["nmi_labels"] < 1.0
  sizes = np.bincount(labels, minlength=8)
  assert result["cluster_size_max"] == sizes.max()
  assert result["empty_clusters"] == (sizes == 0).sum()
  assert 0.05 < result["pixel_kmeans_nmi_labels"] < 1.0
  saved = np.load(tmp_path / "eval" / clusters.FILE)
  np.testing.assert_array_equal(saved["super_labels"] * method.num_sub_clusters
                                + saved["sub_labels"], labels)
  json.dumps(result)


def test_rotnet_features_get_a_flat_kmeans_of_clusters_k(datasets, tmp_path):
  ctx = make_context(tmp_path, datasets, **{"method.num_super_clusters": 1,
                                           "method.num_sub_clusters": 1,
                                           "eval.clusters_k": 6})
  result = clusters.evaluate(ctx)
  assert result["num_clusters"] == 6
  assert result["how"] == "flat k-means of the final features, k = 6"
  assert "pixel_kmeans_nmi_labels" not in result  # eval.clusters_pixel_baseline is off
  labels = ctx.cache["final_labels"]
  assert labels.shape == (1000,) and set(np.unique(labels)) <= set(range(6))
  assert len(np.unique(labels)) > 3
  truth = np.asarray(datasets.train.labels)
  assert result["labelled_images"] == 1000
  assert result["purity_labels"] == pytest.approx(hand_purity(truth, labels))
  assert result["nmi_labels"] > 0.05
  np.testing.assert_array_equal(np.load(tmp_path / "eval" / clusters.FILE)["labels"], labels)


# --- cluster grids ---------------------------------------------------------------------


def test_cluster_grid_png_shows_members_of_the_chosen_clusters(fmnist_train, tmp_path):
  n = 3000
  # A clustering whose clusters have known sizes: classes, with a quarter of class 3
  # split off as the smallest.
  labels = fmnist_train.labels[:n].astype(np.int64)
  labels = np.where((labels == 3) & (np.arange(n) % 4 == 0), 10, labels)
  chosen = cluster_grid.choose_clusters(labels, num_random=4, seed=0)
  sizes = np.bincount(labels)
  assert chosen[0] == ("largest", int(np.argmax(sizes)), int(sizes.max()))
  assert chosen[1] == ("smallest", 10, int(sizes[10]))
  assert [role for role, _, _ in chosen[2:]] == ["random"] * 4
  assert len({c for _, c, _ in chosen}) == 6
  path = tmp_path / "clusters.png"
  drawn = cluster_grid.save_cluster_grids(fmnist_train.images(np.arange(n)), labels, str(path),
                                          num_random=4, per_cluster=16, seed=0)
  assert drawn == chosen
  assert png_shows_data(path)
  # A source instead of an array gives the same picture.
  path2 = tmp_path / "clusters_from_source.png"
  cluster_grid.save_cluster_grids(fmnist_train.subset(np.arange(n)), labels, str(path2), seed=0)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(path2)))


def test_cluster_grid_rejects_wrong_label_count(fmnist_train, tmp_path):
  with pytest.raises(ValueError, match="one label per image"):
    cluster_grid.save_cluster_grids(fmnist_train.images(np.arange(10)), np.zeros(9, int),
                                    str(tmp_path / "x.png"))


def test_cluster_grid_of_rotnet_needs_the_clusters_evaluator_first(datasets, tmp_path):
  ctx = make_context(tmp_path, datasets, **{"method.num_super_clusters": 1,
                                           "method.num_sub_clusters": 1})
  assert "clusters" in cluster_grid.evaluate(ctx)["skipped"]
  ctx.cache["final_labels"] = np.asarray(datasets.train.labels)  # as 'clusters' leaves it
  result = cluster_grid.evaluate(ctx)
  assert [c["role"] for c in result["clusters"][:2]] == ["largest", "smallest"]
  assert png_shows_data(result["path"])


# --- without labels, and results.json ----------------------------------------------------


def test_without_labelled_splits_evaluators_say_why_and_the_rest_still_run(tmp_path):
  ctx = make_context(tmp_path, fashion_datasets(labelled=False),
                     **{"eval.clusters_pixel_baseline": True})
  assert not ctx.labelled()
  spec = ",".join(LABELLED_EVALUATORS) + ",clusters,cluster_grid"
  results = evaluate.run(ctx, spec)
  assert list(results) == [*LABELLED_EVALUATORS, "clusters", "cluster_grid"]
  for name in LABELLED_EVALUATORS:
    assert "config.data.eval_dir" in results[name]["skipped"], name
  # No labels anywhere: cluster sizes, no agreement with classes, no pixel baseline.
  assert "skipped" not in results["clusters"]
  assert results["clusters"]["num_clusters"] == 8
  assert "nmi_labels" not in results["clusters"]
  assert "pixel_kmeans_nmi_labels" not in results["clusters"]
  assert png_shows_data(results["cluster_grid"]["path"])
  written = evaluate.write(str(tmp_path), results)
  with open(tmp_path / evaluate.RESULTS_FILE) as f:
    assert json.load(f) == written == json.loads(json.dumps(results))


def test_run_and_write_replace_their_own_sections_and_keep_the_others(datasets, tmp_path):
  before = {"run": {"steps": 160, "images": 2048}, "probe": {"top1": 0.5},
            "knn": {"top1": 0.0, "stale": True}}
  (tmp_path / evaluate.RESULTS_FILE).write_text(json.dumps(before))
  ctx = make_context(tmp_path, datasets)
  sections = evaluate.run(ctx, " knn ")
  assert list(sections) == ["knn"]
  assert "seconds" in sections["knn"]  # the evaluator's time is recorded (not bounded)
  assert 0.5 < sections["knn"]["top1"] <= 1.0  # random-init fc7 features; chance 0.1
  evaluate.write(str(tmp_path), sections)
  with open(tmp_path / evaluate.RESULTS_FILE) as f:
    after = json.load(f)
  assert after["run"] == before["run"] and after["probe"] == before["probe"]
  assert after["knn"] == sections["knn"] and "stale" not in after["knn"]


def test_scalars_flatten_every_number_under_eval_section_key():
  results = {"probe": {"protocol": "fast", "top1": 0.7, "by_layer": {"conv1": 0.6},
                       "dims": {"conv1": 1568}, "writes": True},
             "clusters": {"nmi_labels": 0.3, "how": "flat", "clusters": [{"size": 3}]},
             "knn": {"skipped": "no labels"}}
  assert evaluate.scalars(results) == {
      "eval/probe/top1": 0.7, "eval/probe/by_layer/conv1": 0.6,
      "eval/probe/dims/conv1": 1568.0, "eval/clusters/nmi_labels": 0.3}


def test_evaluator_names():
  assert evaluate.names(" probe, clusters ,") == ["probe", "clusters"]
  assert set(evaluate.EVALUATORS) == {"probe", "probe_paper", "knn", "clusters", "finetune",
                                      "cluster_grid"}
