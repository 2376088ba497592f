"""PIL helpers shared by the sources that must bring images to one fixed size.

Every source hands the training loop a dense ``uint8 [n, H, W, C]`` block, so
images of varying size (photo folders, tfds datasets such as ImageNet) are
brought to a square ``size x size``: shorter side resized to ``size``, then a
centre crop. This is the evaluation-style view the paper's feature extraction
uses (resize + centre crop), and it keeps the whole image content centred.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Modes PIL decodes into; 'RGB' for channels=3, 'L' for channels=1.
_MODES = {1: "L", 3: "RGB"}


def pil_mode(channels: int) -> str:
  """The PIL mode for ``channels`` (1 → 'L', 3 → 'RGB')."""
  if channels not in _MODES:
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
  return _MODES[channels]


def to_mode(image: Image.Image, channels: int) -> Image.Image:
  """Converts to RGB / L; transparent images lose alpha via an RGBA step.

  Going through RGBA first makes palette images with a transparency colour
  convert without PIL's "palette images with transparency" warning path.
  """
  mode = pil_mode(channels)
  if image.mode == mode:
    return image
  if image.mode in ("P", "PA", "LA") or "transparency" in image.info:
    image = image.convert("RGBA")
  return image.convert(mode)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
  """Shorter side to ``size`` (bilinear, antialiased), then the central square."""
  if size <= 0:
    raise ValueError(f"image_size must be a positive integer, got {size!r}.")
  width, height = image.size
  if (width, height) != (size, size):
    scale = size / min(width, height)
    # max(size, ...) guards against rounding the shorter side below `size`.
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
      image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
  return image


def pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
  """``uint8 [H, W, channels]`` from an image already in mode RGB or L."""
  array = np.asarray(image, dtype=np.uint8)
  if array.ndim == 2:
    array = array[:, :, None]
  if array.shape[-1] != channels:
    raise ValueError(f"expected {channels} channels after conversion, got shape {array.shape}.")
  return array


def decode_file(path: str, size: int, channels: int) -> np.ndarray:
  """Decodes one image file to ``uint8 [size, size, channels]``.

  Uses JPEG draft mode (DCT-domain downscaling by 1/2..1/8, never below the
  requested size) so that large photos decode several times faster, honours the
  EXIF orientation of camera photos, and raises on truncated or corrupt data
  (PIL's default: ``LOAD_TRUNCATED_IMAGES`` is left False).
  """
  with Image.open(path) as image:
    image.draft(None, (size, size))  # no-op for formats other than JPEG
    image.load()
    image = ImageOps.exif_transpose(image)
    image = to_mode(image, channels)
    image = resize_center_crop(image, size)
    return pil_to_array(image, channels)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
  """Resize + centre crop of one ``uint8 [H, W, C]`` array (C in 1, 3)."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected a uint8 [H, W, 1|3] image, got {image.dtype} {image.shape}.")
  channels = image.shape[-1]
  if image.shape[:2] == (size, size):
    return image
  pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
  return pil_to_array(resize_center_crop(pil, size), channels)
