"""On-device augmentations, inside the jitted train step.

Doing them on device keeps the host pipeline a plain gather of uint8 images and makes
them a pure function of the step's RNG, so a resumed run draws the same crops.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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


def random_flip_crop(rng: jax.Array, x: jax.Array, pad: int) -> jax.Array:
  """Random horizontal flip, then a random ``H×W`` crop of the zero-padded image.

  The paper uses random-resized crops at 224 px; on 28–32 px images a padded crop is
  the usual stand-in (a resized crop of a 28 px image loses most of it).
  """
  n, h, w, c = x.shape
  k_flip, k_crop = jax.random.split(rng)
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  x = jnp.where(flip, x[:, :, ::-1], x)
  if pad == 0:
    return x
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)
