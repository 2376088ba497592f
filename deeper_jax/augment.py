"""Views of the images, on device: the centre view features are extracted from, and
the random training views.

Sources hand over square ``uint8`` images of side ``L = data.load_size``; the network
sees ``S = data.image_size``. As in the reference (``src/data/loader.py``):

* extraction and evaluation: the centre ``S x S`` square (the reference's
  ``Resize(256) + CenterCrop(224)``: our sources already resized the shorter side to
  L = 256 and kept the central square);
* training (``train.crop='random_resized'``, the default): torchvision's
  ``RandomResizedCrop(S)`` — a box of a random fraction ``crop_scale`` of the area
  and a random aspect ratio in ``crop_ratio`` (log-uniform), placed uniformly,
  resized to ``S x S`` bilinearly (antialiased when shrinking) — then a horizontal
  flip with probability 1/2, then the rotation of the image's super-class. On
  28-px data L = S and the crop is drawn at that size;
* ``train.crop='pad'``: the older CIFAR-style view, a random ``S x S`` crop of the
  centre view zero-padded by ``crop_pad``, plus the flip.

Doing this on device keeps the host pipeline a plain gather of uint8 images and makes
every view a pure function of the step's RNG, so a resumed run draws the same crops.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

CROPS = ("random_resized", "pad")
# torchvision's RandomResizedCrop defaults, which the reference uses everywhere.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
# torchvision's RandomResizedCrop: tries before falling back to a central crop.
CROP_ATTEMPTS = 10


def center_crop(x: jax.Array, size: int) -> jax.Array:
  """The central ``size x size`` square of ``[..., H, W, C]`` (static slicing)."""
  h, w = x.shape[-3:-1]
  if (h, w) == (size, size):
    return x
  if size > min(h, w):
    raise ValueError(f"cannot take a {size}-px centre crop of {h}x{w} images; lower "
                     "config.data.image_size or raise config.data.load_size.")
  top, left = (h - size) // 2, (w - size) // 2
  return x[..., top:top + size, left:left + size, :]


def crop_boxes(rng: jax.Array, n: int, height: int, width: int,
               scale: tuple[float, float], ratio: tuple[float, float]) -> jax.Array:
  """``[n, 4]`` float boxes ``(top, left, h, w)`` drawn as torchvision's
  ``RandomResizedCrop.get_params``: up to 10 tries of (area, log-aspect) with a box
  that fits, else the largest central box within the ratio range."""
  k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
  shape = (n, CROP_ATTEMPTS)
  area = height * width * jax.random.uniform(k_area, shape, minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, shape, minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=1)  # first attempt that fits (0 if none does)
  pick = lambda v: jnp.take_along_axis(v, first[:, None], axis=1)[:, 0]
  h, w, found = pick(h), pick(w), jnp.any(fits, axis=1)
  # Fallback: the whole image, narrowed to the ratio range, centred.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fallback_w, fallback_h = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fallback_w, fallback_h = round(height * ratio[1]), height
  else:
    fallback_w, fallback_h = width, height
  h = jnp.where(found, h, fallback_h)
  w = jnp.where(found, w, fallback_w)
  # Offsets uniform over the integer positions where the box fits, as randint.
  top = jnp.floor(jax.random.uniform(k_top, (n,)) * (height - h + 1))
  left = jnp.floor(jax.random.uniform(k_left, (n,)) * (width - w + 1))
  top = jnp.where(found, top, (height - h) // 2)
  left = jnp.where(found, left, (width - w) // 2)
  return jnp.stack([top, left, h, w], axis=1)


def resize_boxes(x: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """Each image's box ``(top, left, h, w)`` of ``x [n, H, W, C]`` resized to ``size``.

  Bilinear with antialiasing, sampling only inside the box: box edges map to the
  output's edges (``jax.image.scale_and_translate``), so no zero border enters.
  """
  def one(image, box):
    top, left, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / h, size / w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(
        image, (size, size, image.shape[-1]), (0, 1), scale, translation,
        method="linear", antialias=True)
  return jax.vmap(one)(x, boxes)


def random_resized_crop(rng: jax.Array, x: jax.Array, size: int,
                        scale: tuple[float, float] = DEFAULT_SCALE,
                        ratio: tuple[float, float] = DEFAULT_RATIO) -> jax.Array:
  """torchvision's ``RandomResizedCrop(size)`` of each image of ``x [n, H, W, C]``."""
  boxes = crop_boxes(rng, x.shape[0], x.shape[1], x.shape[2], tuple(scale), tuple(ratio))
  return resize_boxes(x, boxes, size)


def random_flip(rng: jax.Array, x: jax.Array) -> jax.Array:
  """Horizontal flip of each image of ``[n, H, W, C]`` with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1], x)


def pad_crop(rng: jax.Array, x: jax.Array, pad: int) -> jax.Array:
  """A random ``H x W`` crop of each image zero-padded by ``pad`` on every side."""
  if pad == 0:
    return x
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def training_view(rng: jax.Array, x: jax.Array, size: int, train_config) -> jax.Array:
  """The random training view ``[n, size, size, C]`` of ``x [n, L, L, C]`` (floats)."""
  k_crop, k_flip = jax.random.split(rng)
  if train_config.crop == "random_resized":
    x = random_resized_crop(k_crop, x, size, train_config.crop_scale, train_config.crop_ratio)
  elif train_config.crop == "pad":
    x = pad_crop(k_crop, center_crop(x, size), train_config.crop_pad)
  else:
    raise ValueError(f"train.crop must be one of {CROPS}, got {train_config.crop!r}.")
  return random_flip(k_flip, x)


def rotate_slices(x: jax.Array, num_rotations: int) -> jax.Array:
  """Rotates slice ``s`` of ``[S, b, H, W, C]`` by ``(s % R)·90°``.

  Super-class ``s = R·c + r`` holds super-cluster ``c`` under rotation ``r``, so the
  rotation of a slice is known from its position alone; no per-image label is needed.
  """
  if num_rotations == 1:
    return x
  num_super = x.shape[0]
  grouped = x.reshape((num_super // num_rotations, num_rotations) + x.shape[1:])
  rotated = [jnp.rot90(grouped[:, r], k=r, axes=(2, 3)) for r in range(num_rotations)]
  return jnp.stack(rotated, axis=1).reshape(x.shape)
