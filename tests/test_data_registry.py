"""tfds sources (array_record, no TensorFlow, no download) and the dataset registry."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from conftest import data_config  # fixtures fmnist_* live there too
from deeper_jax.data import DATASETS, Datasets, build_datasets, long_tail_indices, registry
from deeper_jax.errors import ConfigError, DatasetNotFoundError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- tfds (array_record, no TensorFlow, no download) ---------------------------

def _prepare_tiny_tfds(data_dir: str) -> None:
  """Writes two tiny array_record tfds datasets from real images (no TF needed)."""
  import tensorflow_datasets as tfds
  from sklearn.datasets import load_digits as sk_digits, load_sample_images
  digits = sk_digits()
  photos = load_sample_images().images

  with tfds.core.registered.skip_registration():

    class TinyDigits(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10)}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 60), "test": self._generate_examples(60, 80)}

      def _generate_examples(self, start, stop):
        for i in range(start, stop):
          image = np.round(digits.images[i] * 255 / 16).astype(np.uint8)[..., None]
          yield i, {"image": image, "label": int(digits.target[i])}

    class TinyPhotos(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib")}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i, photo in enumerate(photos):
          yield i, {"image": photo[::8, ::(8 + 4 * i)]}  # two different shapes

    for cls in (TinyDigits, TinyPhotos):
      cls(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _prepare_tiny_tfds(data_dir)
  return data_dir


class TestTfds:

  def test_missing_dataset_is_a_clear_error_without_download(self, tmp_path):
    from deeper_jax.data.tfds_source import TfdsSource
    with pytest.raises(DatasetNotFoundError) as info:
      TfdsSource("fashion_mnist", "train", str(tmp_path))
    message = str(info.value)
    assert "not prepared" in message and "tfds build fashion_mnist" in message
    assert "array_record" in message and str(tmp_path) in message
    assert not (tmp_path / "downloads").exists()

  def test_unknown_name(self, tmp_path):
    from deeper_jax.data.tfds_source import TfdsSource
    with pytest.raises(DatasetNotFoundError, match="config.data.tfds_name='no_such_dataset_xyz'"):
      TfdsSource("no_such_dataset_xyz", "train", str(tmp_path))

  def test_reads_prepared_dataset(self, tiny_tfds):
    from deeper_jax.data.tfds_source import TfdsSource
    from sklearn.datasets import load_digits as sk_digits
    digits = sk_digits()
    source = TfdsSource("tiny_digits", "train", tiny_tfds)
    assert len(source) == 60 and source.image_shape == (8, 8, 1) and source.num_classes == 10
    # tfds shuffles records on write; match each record to its sklearn digit via its label+pixels.
    expected = np.round(digits.images[:60] * 255 / 16).astype(np.uint8)
    got = source.images(np.arange(60))[..., 0]
    matches = [np.flatnonzero((expected == image).all(axis=(1, 2))) for image in got]
    assert set(np.concatenate(matches).tolist()) == set(range(60)), "every digit read back"
    for label, match in zip(source.labels, matches):
      assert label in digits.target[match], "each image keeps its own label"
    sub = source.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub.images(np.arange(2)), source.images(np.array([3, 1])))
    np.testing.assert_array_equal(sub.labels, source.labels[[3, 1]])
    assert len(TfdsSource("tiny_digits", "train[:10]", tiny_tfds)) == 10
    rgb = TfdsSource("tiny_digits", "test", tiny_tfds, image_size=16, channels=3)
    assert rgb.images(np.array([0])).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="splits"):
      TfdsSource("tiny_digits", "validation", tiny_tfds)

  def test_varying_shapes_need_image_size(self, tiny_tfds):
    from deeper_jax.data.tfds_source import TfdsSource
    with pytest.raises(ValueError, match="config.data.image_size"):
      TfdsSource("tiny_photos", "train", tiny_tfds)
    source = TfdsSource("tiny_photos", "train", tiny_tfds, image_size=24)
    batch = source.images(np.arange(2))
    assert batch.shape == (2, 24, 24, 3) and source.labels is None
    assert abs(float(batch[0].mean()) - float(batch[1].mean())) > 1  # two different photos

  def test_name_and_split_are_public_and_identify_its_images(self, tiny_tfds):
    from deeper_jax.data.fingerprint import fingerprint, item_ids
    from deeper_jax.data.tfds_source import TfdsSource
    source = TfdsSource("tiny_digits", "train[:10]", tiny_tfds)
    assert source.name == "tiny_digits" and source.split == "train[:10]"
    ids = item_ids(source)
    assert ids[:2] == ["tiny_digits/train[:10]/0", "tiny_digits/train[:10]/1"] and len(ids) == 10
    assert item_ids(source.subset(np.array([7, 3]))) == [ids[7], ids[3]]
    other = TfdsSource("tiny_digits", "train[:11]", tiny_tfds)
    assert fingerprint(item_ids(other)) != fingerprint(ids)

  def test_registry_tfds(self, tiny_tfds):
    config = data_config(name="tfds", tfds_name="tiny_digits", data_dir=tiny_tfds, image_size=8)
    datasets = build_datasets(config)
    assert len(datasets.train) == 60 and len(datasets.test) == 20
    assert datasets.labelled_train is datasets.train
    # channels=0 means 3 for tfds, known without reading an image.
    assert datasets.train.image_shape == (8, 8, 3) == (8, 8, registry.image_channels(config))
    config.channels, config.load_size = 1, 12
    datasets = build_datasets(config)
    assert datasets.test.image_shape == (12, 12, 1) == (12, 12, registry.image_channels(config))
    with pytest.raises(ConfigError, match="config.data.tfds_name"):
      build_datasets(data_config(name="tfds", tfds_name=""))

  def test_no_tensorflow_imported(self, tiny_tfds):
    """Importing the package and reading a tfds source must not pull in TensorFlow."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import deeper_jax.data as data
        assert "tensorflow_datasets" not in sys.modules, "tfds imported eagerly"
        assert "tensorflow" not in sys.modules
        from deeper_jax.data.tfds_source import TfdsSource
        source = TfdsSource("tiny_digits", "train", {tiny_tfds!r})
        source.images(np.arange(4)); source.labels
        TfdsSource("tiny_photos", "train", {tiny_tfds!r}, image_size=16).images(np.arange(2))
        assert "tensorflow" not in sys.modules, "reading tfds imported TensorFlow"
        print("ok")
        """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


# --- registry ----------------------------------------------------------------------

class TestRegistry:

  def test_longtail_train_balanced_probes(self, fmnist_train):
    datasets = build_datasets(data_config())
    assert isinstance(datasets, Datasets)
    counts = np.bincount(datasets.train.labels, minlength=10)
    assert counts[0] == 6000 and counts[9] == 600
    assert len(datasets.labelled_train) == 60000 and len(datasets.test) == 10000
    np.testing.assert_array_equal(np.bincount(datasets.labelled_train.labels), [6000] * 10)
    # The long-tailed train set is made of real train images.
    keep = long_tail_indices(fmnist_train.labels, 10.0, seed=0)
    np.testing.assert_array_equal(datasets.train.images(np.arange(5)), fmnist_train.array[keep[:5]])

  def test_balanced_fashion_mnist(self):
    datasets = build_datasets(data_config(name="fashion_mnist"))
    assert len(datasets.train) == 60000 and len(datasets.test) == 10000

  def test_max_images_and_resize(self):
    config = data_config(max_train_images=500, max_eval_images=300, image_size=32)
    a, b = build_datasets(config), build_datasets(config)
    assert len(a.train) == 500 and len(a.labelled_train) == 300 and len(a.test) == 300
    assert a.train.image_shape == (32, 32, 1)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    np.testing.assert_array_equal(a.train.images(np.arange(4)), b.train.images(np.arange(4)))
    config.seed = 1
    assert not np.array_equal(build_datasets(config).train.labels, a.train.labels)
    for field in ("max_train_images", "max_eval_images"):
      with pytest.raises(ConfigError, match=f"config.data.{field}=-1"):
        build_datasets(data_config(**{field: -1}))

  def test_load_size_is_the_size_sources_decode_to(self, fmnist_test):
    datasets = build_datasets(data_config(image_size=28, load_size=36))
    for source in datasets:
      assert source.image_shape == (36, 36, 1)
    assert registry.load_size(data_config(image_size=28, load_size=0)) == 28
    assert registry.load_size(data_config(image_size=28, load_size=36)) == 36
    # Upsampled (the network crops image_size squares from them), not padded.
    from PIL import Image
    expected = Image.fromarray(fmnist_test.array[3, :, :, 0]).resize((36, 36),
                                                                      Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(datasets.test.images(np.array([3]))[0, :, :, 0],
                                  np.asarray(expected))

  def test_digits(self):
    datasets = build_datasets(data_config(name="digits", image_size=16))
    assert datasets.train.image_shape == (16, 16, 1)
    assert len(datasets.train) == 1442 and len(datasets.test) == 355
    larger = build_datasets(data_config(name="digits", image_size=16, load_size=20))
    assert larger.test.image_shape == (20, 20, 1)

  @pytest.mark.parametrize("name, channels, expected", [
      ("fashion_mnist", 0, 1), ("fashion_mnist_longtail", 3, 1), ("digits", 0, 1),
      ("image_folder", 0, 3), ("image_folder", 1, 1), ("tfds", 0, 3), ("tfds", 1, 1),
      ("array_record", 0, 3), ("array_record", 1, 1),
  ])
  def test_image_channels_known_from_the_config(self, name, channels, expected):
    assert registry.image_channels(data_config(name=name, channels=channels)) == expected

  def test_unknown_name_is_a_config_error_listing_valid_ones(self):
    with pytest.raises(ConfigError) as info:
      build_datasets(data_config(name="imagenet"))
    assert "config.data.name='imagenet'" in str(info.value)
    assert set(DATASETS) == {"fashion_mnist", "fashion_mnist_longtail",
                             "fashion_mnist_uncurated", "digits", "image_folder",
                             "array_record", "tfds"}
    assert all(name in str(info.value) for name in DATASETS)

  def test_every_field_is_read_strictly(self):
    """A config missing a field is a bug in the config, not a reason to guess a default."""
    fields = data_config(name="digits").to_dict()
    del fields["load_size"]
    with pytest.raises((AttributeError, KeyError), match="load_size"):
      build_datasets(ml_collections.ConfigDict(fields))

  def test_image_folder_needs_data_dir(self, tmp_path):
    with pytest.raises(ConfigError, match="config.data.data_dir"):
      build_datasets(data_config(name="image_folder", data_dir=""))
    with pytest.raises(DatasetNotFoundError, match="config.data.data_dir"):
      build_datasets(data_config(name="image_folder", data_dir=str(tmp_path / "missing")))

  def test_missing_fashion_mnist_dir_names_the_fixes(self, tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
      build_datasets(data_config(data_dir=str(tmp_path)))
    message = str(info.value)
    assert "--config.data.data_dir" in message and "--config.data.download=true" in message
    assert "apt-get install dataset-fashion-mnist" in message

  def test_sources_pickle(self):
    """Data-loader worker processes receive sources by pickling."""
    datasets = build_datasets(data_config(name="digits", max_train_images=100))
    clone = pickle.loads(pickle.dumps(datasets.train))
    np.testing.assert_array_equal(clone.images(np.arange(3)), datasets.train.images(np.arange(3)))
