"""PIL helpers shared by the sources that must bring images to one fixed size.

Every source hands the training loop a dense ``uint8 [n, H, W, C]`` block, so
images of varying size (photo folders, tfds datasets such as ImageNet) are
brought to a square ``size x size``: shorter side resized to ``size``, then a
centre crop. This is the evaluation-style view the paper's feature extraction
uses (resize + centre crop), and it keeps the whole image content centred.

Real photo collections hold every oddity PIL can open, so the conversions here
are explicit about what PIL would otherwise get wrong or make expensive:

* The central square is cut *before* resizing (one PIL resize with a source
  box): a 1×3000 banner never becomes a 28×84000 intermediate.
* 16-bit (and 32-bit integer) grayscale is scaled to 8 bits; PIL's own
  ``convert('L')`` clips everything above 255 to white.
* Transparent images (RGBA, LA, palettes with a transparent colour) are
  composited onto white, the background they were made to be shown on; dropping
  alpha would show whatever colour the invisible pixels happen to hold.
* Images above ``PIL.Image.MAX_IMAGE_PIXELS`` are refused before decoding. PIL
  itself raises only above twice that and merely warns in between; a
  decompression bomb must not be decoded at all.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import stat

import numpy as np
from PIL import Image, ImageOps

# Modes PIL decodes into; 'RGB' for channels=3, 'L' for channels=1.
_MODES = {1: "L", 3: "RGB"}


def pil_mode(channels: int) -> str:
  """The PIL mode for ``channels`` (1 → 'L', 3 → 'RGB')."""
  if channels not in _MODES:
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
  return _MODES[channels]


_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255, 255)  # what transparent pixels become


def check_pixels(image: Image.Image) -> None:
  """Raises ``DecompressionBombError`` above ``MAX_IMAGE_PIXELS`` (PIL only warns up to 2×)."""
  limit = Image.MAX_IMAGE_PIXELS
  width, height = image.size
  if limit is not None and width * height > limit:
    raise Image.DecompressionBombError(
        f"{width}x{height} = {width * height} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS={limit}: "
        "possible decompression bomb, not decoded.")


def to_8bit(image: Image.Image) -> Image.Image:
  """16-bit / 32-bit integer grayscale as 8-bit 'L', scaled (PIL's convert clips at 255).

  ``I;16*`` spans 0..65535. Mode ``I`` is 32-bit, but in practice holds 16-bit
  samples (PNG, TIFF): it is scaled as 16-bit when any value exceeds 255, and
  kept as it is (clipped to 0..255) otherwise.
  """
  if image.mode not in _WIDE_GRAY_MODES:
    return image
  array = np.asarray(image).astype(np.int64)
  if image.mode != "I" or array.max(initial=0) > 255:
    array = (np.clip(array, 0, 65535) * 255 + 32767) // 65535  # round(v / 257)
  return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")


def _has_alpha(image: Image.Image) -> bool:
  if image.mode in _ALPHA_MODES or "transparency" in image.info:
    return True
  return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def to_mode(image: Image.Image, channels: int) -> Image.Image:
  """Converts to RGB / L: wide grayscale scaled to 8 bits, transparency composited on white."""
  mode = pil_mode(channels)
  image = to_8bit(image)
  if image.mode == mode:
    return image
  if _has_alpha(image):
    image = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND), image)
  return image.convert(mode)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
  """The central square (side = shorter side), resized to ``size`` (bilinear, antialiased).

  One resize with a source box: memory stays ``O(size^2)`` whatever the aspect
  ratio. Same view as "shorter side to ``size``, then centre crop" up to a
  sub-pixel shift of the crop.
  """
  if size <= 0:
    raise ValueError(f"image_size must be a positive integer, got {size!r}.")
  width, height = image.size
  if (width, height) == (size, size):
    return image
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  box = (left, top, left + side, top + side)
  if side == size:
    return image.crop(box)
  return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


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
  (PIL's default: ``LOAD_TRUNCATED_IMAGES`` is left False), on images above
  ``MAX_IMAGE_PIXELS`` and on paths that are not regular files (a FIFO named
  ``.jpg`` would block the reader forever).
  """
  if not stat.S_ISREG(os.stat(path).st_mode):
    raise OSError(f"{path} is not a regular file")
  with Image.open(path) as image:
    return _decode_opened(image, size, channels)


def decode_bytes(data: bytes, size: int, channels: int) -> np.ndarray:
  """``decode_file`` of an image file's bytes (ArrayRecord shards hold them): same pixels."""
  with Image.open(io.BytesIO(data)) as image:
    return _decode_opened(image, size, channels)


def verify_bytes(data: bytes) -> None:
  """Raises unless ``data`` is an image that decodes in full (the packer's check).

  Stricter than a header read: every pixel is decoded at full size (no draft), so a
  truncated JPEG or PNG fails here rather than at training time.
  """
  if not data:
    raise ValueError("empty file")
  with Image.open(io.BytesIO(data)) as image:
    check_pixels(image)
    image.load()
    to_mode(ImageOps.exif_transpose(image), 3)


def _decode_opened(image: Image.Image, size: int, channels: int) -> np.ndarray:
  check_pixels(image)
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


class DecodeThreads:
  """Maps a decode function over one batch's items on a few threads.

  PIL releases the GIL while it decodes, so a folder or shard source decodes a batch
  on ``num_threads`` threads (the pool is made on first use; one item, or one thread,
  runs inline). Pickles without its pool, so a source holding one can travel to the
  input pipeline's worker processes.
  """

  def __init__(self, num_threads: int):
    self.num_threads = max(1, int(num_threads))
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def map(self, fn, items) -> list:
    items = list(items)
    if len(items) < 2 or self.num_threads < 2:
      return [fn(item) for item in items]
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
    return list(self._pool.map(fn, items))

  def __getstate__(self):
    return {"num_threads": self.num_threads, "_pool": None}

