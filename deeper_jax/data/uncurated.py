"""An "uncurated" Fashion-MNIST: the long tail plus the junk a photo crawl holds.

The paper pre-trains on YFCC100M, whose difficulty is not only its long tail: a
crawl holds near-duplicates (the same photo uploaded, re-compressed and cropped
again and again), off-topic photos, blanks and screenshots. A method that copes
with uncurated data must not spend its clusters on them. This module adds both
kinds of junk, built offline from images that numpy, Pillow, scikit-learn and
matplotlib already ship, to the long-tailed Fashion-MNIST train split:

* **originals**: the long-tailed set itself (``long_tail.py``), unchanged;
* **near-duplicates** (``duplicate_fraction`` of the final set, default 10%):
  jittered copies of a *few* originals (``NUM_DUPLICATE_SOURCES``, each copied
  many times, in equal shares): a random shift of up to ±``MAX_SHIFT`` px
  (zero fill, like Fashion-MNIST's black background), a contrast × brightness
  jitter, then a JPEG re-compression at a random quality in ``JPEG_QUALITY``.
  They keep their source's label;
* **clutter** (``clutter_fraction``, default 20%), out of domain and unlabelled
  (label ``UNLABELLED`` = -1), mixed in the proportions of ``CLUTTER_MIX``:

  - ``photo``: random crops (random area 1–50% of the photo, aspect 3:4–4:3,
    random position) of scikit-learn's china.jpg and flower.jpg and
    matplotlib's grace_hopper.jpg, in grayscale, resized to 28×28;
  - ``graphic``: the same crops of matplotlib's logo2.png and
    Minduka_Present_Blue_Pack.png (transparency on white): the logos and
    screenshots of a crawl;
  - ``digit``: scikit-learn's 8×8 digits upsampled to 28×28, half of them
    inverted (dark ink on white);
  - ``blank``: one constant grey level (0–255);
  - ``noise``: uniform (0–255) or Gaussian noise, half of it blurred.

  Crops with almost no contrast (pixel std below ``MIN_CROP_STD``) are drawn
  again (up to 20 times), so that every photo or graphic crop shows some
  structure; flat images are the ``blank`` kind's job.

Everything is shuffled into one order. ``seed`` fixes every choice (which
sources, every jitter, every crop, the order): the same seed gives the same
bytes, and different seeds different sets.

Each image's kind is recorded: ``UncuratedSource.kinds`` holds an ``int8`` index
into ``KINDS`` per image, and ``UncuratedSource.origin`` the index of the
Fashion-MNIST train image an original is, or a duplicate was copied from (-1 for
clutter). Both follow the source through ``subset``; ``kinds_of(source)`` also
sees through the registry's subset and resize views, so that a notebook can
report, for example, the share of clutter in each cluster of a run's training set.
"""
from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image, ImageFilter

from deeper_jax.data import imaging
from deeper_jax.data.sources import (UNLABELLED, ArraySource, ResizedSource, Source,
                                     SubsetSource, as_indices, read_all)

SIZE = 28  # side of every image (Fashion-MNIST's)
KINDS = ("original", "duplicate", "photo", "graphic", "digit", "blank", "noise")
ORIGINAL, DUPLICATE = KINDS.index("original"), KINDS.index("duplicate")
# Clutter kind -> share of the clutter (sums to 1).
CLUTTER_MIX = (("photo", 0.35), ("graphic", 0.10), ("digit", 0.20), ("blank", 0.10),
               ("noise", 0.25))
NUM_DUPLICATE_SOURCES = 50
MAX_SHIFT = 2                # px, each axis
CONTRAST = (0.85, 1.15)      # pixel × contrast + brightness
BRIGHTNESS = (-15.0, 15.0)
JPEG_QUALITY = (20, 80)      # inclusive
CROP_AREA = (0.01, 0.5)      # of the photo's area
CROP_RATIO = (3 / 4, 4 / 3)  # width / height
MIN_CROP_STD = 10.0          # grey levels
NOISE_GAUSSIAN_STD = (50.0, 90.0)  # grey levels, around a mean level in 64..192
NOISE_BLUR_RADIUS = (0.5, 1.0)     # px, Gaussian blur of half of the noise images
_SEED_SALT = 0x0C1A77E2      # keeps these streams apart from the long tail's (same data.seed)


def _check_fraction(name: str, value: float) -> float:
  if not np.isfinite(value) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name} (config.data.{name}) must lie in [0, 1), got {value!r}.")
  return float(value)


def split_sizes(num_originals: int, duplicate_fraction: float,
                clutter_fraction: float) -> tuple[int, int]:
  """(duplicates, clutter) so that they are these fractions of the whole set."""
  duplicate_fraction = _check_fraction("duplicate_fraction", duplicate_fraction)
  clutter_fraction = _check_fraction("clutter_fraction", clutter_fraction)
  original_fraction = 1.0 - duplicate_fraction - clutter_fraction
  if original_fraction <= 0:
    raise ValueError(
        f"duplicate_fraction + clutter_fraction must be < 1 (the rest are the originals), got "
        f"{duplicate_fraction} + {clutter_fraction}.")
  total = num_originals / original_fraction
  return int(round(duplicate_fraction * total)), int(round(clutter_fraction * total))


def clutter_counts(num_clutter: int) -> dict[str, int]:
  """Images of each clutter kind: ``CLUTTER_MIX`` shares, rounded to sum to ``num_clutter``."""
  shares = np.array([share for _, share in CLUTTER_MIX]) * num_clutter
  counts = np.floor(shares).astype(np.int64)
  # Largest remainders first; ties in CLUTTER_MIX order (stable sort), no RNG needed.
  for i in np.argsort(-(shares - counts), kind="stable")[:num_clutter - counts.sum()]:
    counts[i] += 1
  return {name: int(n) for (name, _), n in zip(CLUTTER_MIX, counts)}


# --- near-duplicates ---------------------------------------------------------------

def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """``image`` [H, W] moved by (dy, dx) pixels, the uncovered border filled with 0."""
  out = np.zeros_like(image)
  height, width = image.shape
  out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = (
      image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)])
  return out


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  """``uint8 [H, W]`` through a grayscale JPEG encode + decode at ``quality``."""
  buffer = io.BytesIO()
  Image.fromarray(image, "L").save(buffer, format="JPEG", quality=int(quality))
  buffer.seek(0)
  with Image.open(buffer) as decoded:
    return np.asarray(decoded.convert("L"), np.uint8)


def near_duplicate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One jittered, re-compressed copy of a ``uint8 [H, W]`` image."""
  dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
  moved = shift(image, int(dy), int(dx)).astype(np.float32)
  jittered = moved * rng.uniform(*CONTRAST) + rng.uniform(*BRIGHTNESS)
  jittered = np.clip(np.round(jittered), 0, 255).astype(np.uint8)
  return jpeg(jittered, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))


def duplicate_sources(num_originals: int, num_duplicates: int,
                      rng: np.random.Generator) -> np.ndarray:
  """For each duplicate, the original it copies: a few sources, equal shares (±1)."""
  if num_duplicates == 0:
    return np.zeros(0, np.int64)
  if num_originals == 0:
    raise ValueError("near-duplicates need at least one original image to copy.")
  chosen = rng.choice(num_originals, size=min(NUM_DUPLICATE_SOURCES, num_originals),
                      replace=False)
  return chosen[np.arange(num_duplicates) % len(chosen)]


# --- clutter -------------------------------------------------------------------------

def _gray_files(paths: tuple[str, ...]) -> tuple[Image.Image, ...]:
  images = []
  for path in paths:
    with Image.open(path) as image:
      image.load()
      images.append(imaging.to_mode(image, 1))
  return tuple(images)


@functools.lru_cache(maxsize=1)
def photos() -> tuple[Image.Image, ...]:
  """The bundled photos in grayscale: china.jpg, flower.jpg, grace_hopper.jpg."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  sklearn_photos = tuple(Image.fromarray(photo).convert("L")
                         for photo in load_sample_images().images)
  return sklearn_photos + _gray_files((_matplotlib_sample("grace_hopper.jpg"),))


@functools.lru_cache(maxsize=1)
def graphics() -> tuple[Image.Image, ...]:
  """matplotlib's bundled logo and icon in grayscale, transparency on white."""
  return _gray_files((_matplotlib_sample("logo2.png"),
                      _matplotlib_sample("Minduka_Present_Blue_Pack.png")))


def _matplotlib_sample(name: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  return os.path.join(matplotlib.get_data_path(), "sample_data", name)


def random_crop(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
  """A crop of random area, aspect and position, resized to ``SIZE``×``SIZE`` (bilinear)."""
  width, height = image.size
  area = rng.uniform(*CROP_AREA) * width * height
  ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
  crop_w = int(np.clip(round(np.sqrt(area * ratio)), 2, width))
  crop_h = int(np.clip(round(np.sqrt(area / ratio)), 2, height))
  left = int(rng.integers(0, width - crop_w + 1))
  top = int(rng.integers(0, height - crop_h + 1))
  box = (left, top, left + crop_w, top + crop_h)
  return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box), np.uint8)


def _crops(pool: tuple[Image.Image, ...], n: int, rng: np.random.Generator) -> np.ndarray:
  out = np.empty((n, SIZE, SIZE), np.uint8)
  for i in range(n):
    image = pool[int(rng.integers(len(pool)))]
    best = None
    for _ in range(20):  # a flat patch (sky, white background) is drawn again
      crop = random_crop(image, rng)
      if best is None or crop.std() > best.std():
        best = crop
      if best.std() >= MIN_CROP_STD:
        break
    out[i] = best
  return out


def photo_crops(n: int, rng: np.random.Generator) -> np.ndarray:
  return _crops(photos(), n, rng)


def graphic_crops(n: int, rng: np.random.Generator) -> np.ndarray:
  return _crops(graphics(), n, rng)


def digit_images(n: int, rng: np.random.Generator) -> np.ndarray:
  """scikit-learn digits upsampled to ``SIZE``, each inverted with probability 1/2."""
  from deeper_jax.data.digits import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits("all", SIZE).array[..., 0]
  out = digits[rng.integers(len(digits), size=n)]
  invert = rng.random(n) < 0.5
  out[invert] = 255 - out[invert]
  return out


def blank_images(n: int, rng: np.random.Generator) -> np.ndarray:
  levels = rng.integers(0, 256, size=n).astype(np.uint8)
  return np.broadcast_to(levels[:, None, None], (n, SIZE, SIZE)).copy()


def noise_images(n: int, rng: np.random.Generator) -> np.ndarray:
  """Uniform or Gaussian noise (half each), half of the images blurred."""
  out = np.empty((n, SIZE, SIZE), np.uint8)
  for i in range(n):
    if rng.random() < 0.5:
      noise = rng.uniform(0, 256, size=(SIZE, SIZE))
    else:
      level, spread = rng.uniform(64, 192), rng.uniform(*NOISE_GAUSSIAN_STD)
      noise = rng.normal(level, spread, size=(SIZE, SIZE))
    image = np.clip(noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
      blur = ImageFilter.GaussianBlur(rng.uniform(*NOISE_BLUR_RADIUS))
      image = np.asarray(Image.fromarray(image, "L").filter(blur), np.uint8)
    out[i] = image
  return out


GENERATORS = {"photo": photo_crops, "graphic": graphic_crops, "digit": digit_images,
              "blank": blank_images, "noise": noise_images}


def clutter(num_clutter: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """``uint8 [n, SIZE, SIZE]`` clutter images and their kinds (indices into ``KINDS``)."""
  images, kinds = [], []
  for name, count in clutter_counts(num_clutter).items():
    images.append(GENERATORS[name](count, rng))
    kinds.append(np.full(count, KINDS.index(name), np.int8))
  return np.concatenate(images), np.concatenate(kinds)


# --- the set -------------------------------------------------------------------------

class UncuratedSource(ArraySource):
  """An ``ArraySource`` whose images also carry their ``kinds`` and ``origin``."""

  def __init__(self, images, labels, num_classes, kinds, origin):
    super().__init__(images, labels, num_classes)
    kinds, origin = np.asarray(kinds, np.int8), np.asarray(origin, np.int64)
    if kinds.shape != (len(self),) or origin.shape != (len(self),):
      raise ValueError(f"kinds and origin must have shape ({len(self)},), got {kinds.shape} "
                       f"and {origin.shape}.")
    kinds.setflags(write=False)
    origin.setflags(write=False)
    self._kinds, self._origin = kinds, origin

  @property
  def kinds(self) -> np.ndarray:
    """``int8 [N]``: each image's kind, an index into ``KINDS``."""
    return self._kinds

  @property
  def origin(self) -> np.ndarray:
    """``int64 [N]``: the Fashion-MNIST train image it is or copies; -1 for clutter."""
    return self._origin

  def subset(self, indices) -> "UncuratedSource":
    indices = as_indices(indices, len(self))
    return UncuratedSource(self.array[indices], self.labels[indices], self.num_classes,
                           self._kinds[indices], self._origin[indices])

  def __repr__(self) -> str:
    counts = np.bincount(self._kinds, minlength=len(KINDS))
    return f"UncuratedSource(n={len(self)}, {dict(zip(KINDS, counts.tolist()))})"


def make_uncurated(originals: Source, *, duplicate_fraction: float, clutter_fraction: float,
                   seed: int, origin: np.ndarray | None = None) -> UncuratedSource:
  """``originals`` (28×28 grayscale, labelled) plus near-duplicates and clutter, shuffled.

  Args:
    originals: the curated part (the registry passes the long-tailed set).
    duplicate_fraction: near-duplicates' share of the result.
    clutter_fraction: unlabelled clutter's share of the result.
    seed: fixes every random choice (``config.data.seed``).
    origin: the index of each original in the dataset it comes from (default
      ``arange``), recorded in ``UncuratedSource.origin``.
  """
  if tuple(originals.image_shape) != (SIZE, SIZE, 1) or originals.labels is None:
    raise ValueError(f"originals must be labelled {SIZE}x{SIZE}x1 images, got shape "
                     f"{originals.image_shape} and labels {originals.labels is not None}.")
  num_originals = len(originals)
  origin = np.arange(num_originals) if origin is None else np.asarray(origin, np.int64)
  if origin.shape != (num_originals,):
    raise ValueError(f"origin must hold one index per original, got shape {origin.shape}.")
  num_duplicates, num_clutter = split_sizes(num_originals, duplicate_fraction, clutter_fraction)
  dup_rng, clutter_rng, order_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence([_SEED_SALT, seed]).spawn(3))

  images = read_all(originals)[..., 0]
  labels = np.asarray(originals.labels)
  sources = duplicate_sources(num_originals, num_duplicates, dup_rng)
  duplicates = np.stack([near_duplicate(images[s], dup_rng) for s in sources]) if len(
      sources) else np.zeros((0, SIZE, SIZE), np.uint8)
  clutter_images, clutter_kinds = clutter(num_clutter, clutter_rng)

  all_images = np.concatenate([images, duplicates, clutter_images])[..., None]
  all_labels = np.concatenate([labels, labels[sources],
                               np.full(num_clutter, UNLABELLED)]).astype(np.int32)
  kinds = np.concatenate([np.full(num_originals, ORIGINAL, np.int8),
                          np.full(num_duplicates, DUPLICATE, np.int8), clutter_kinds])
  all_origin = np.concatenate([origin, origin[sources], np.full(num_clutter, -1)])
  order = order_rng.permutation(len(all_images))
  return UncuratedSource(all_images[order], all_labels[order], originals.num_classes,
                         kinds[order], all_origin[order])


def kinds_of(source: Source) -> np.ndarray | None:
  """Each image's kind (``int8`` index into ``KINDS``), seen through subset and resize views.

  ``None`` when the source is not (a view of) an ``UncuratedSource``.
  """
  indices = np.arange(len(source))
  while isinstance(source, (SubsetSource, ResizedSource)):
    if isinstance(source, SubsetSource):
      indices = source._indices[indices]  # pylint: disable=protected-access
    source = source._base  # pylint: disable=protected-access
  kinds = getattr(source, "kinds", None)
  return None if kinds is None else kinds[indices]


def kind_names(source: Source) -> np.ndarray | None:
  """``kinds_of`` as strings (``'original'``, ``'photo'``, ...)."""
  kinds = kinds_of(source)
  return None if kinds is None else np.asarray(KINDS)[kinds]
