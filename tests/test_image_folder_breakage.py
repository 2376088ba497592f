"""A folder of real-world breakage, built by the test suite (issue 16.2).

Uncurated photo collections (the YFCC path, ``data.name='image_folder'``) hold every
file a camera, a scraper or a half-finished copy can leave behind. This file plants
each kind next to real photos (crops of scikit-learn's sample images, matplotlib's
grace_hopper.jpg, Fashion-MNIST images saved as PNG) and decides, per kind, what it
must be:

* **usable**: decoded to the right pixels. CMYK JPEGs, 16-bit PNGs, transparent
  images (composited on white), animated GIFs (first frame), a 1×1 image, 1×3000
  banners (their central square), corrupt EXIF, odd file names, a JPEG named
  ``.png``;
* **broken**: skipped, listed in ``source.skipped`` with a reason, never fatal;
  found at scan time when the header tells (empty, not an image, a decompression
  bomb, a dangling or looping symlink, a FIFO), at read time otherwise (truncated
  data, a file changed or deleted after the scan), where the image is replaced by
  the next decodable one of the folder order;
* a directory symlink loop is walked once.

27 kinds in all: 13 broken, 13 usable oddities, the loop.

Images are small (SIZE px) so the whole file runs in seconds.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import matplotlib
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from deeper_jax.data import ImageFolderSource, load_fashion_mnist

pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore:Corrupt EXIF data")]

SIZE = 24
NON_UTF8_NAME = os.fsdecode(b"latin1-\xe9t\xe9.png")  # a name that is not valid UTF-8
UNICODE_NAME = "café 北京 photo.jpg"  # non-ASCII and spaces

# Broken kinds, one file each: path -> words its reason in `skipped` must contain.
BROKEN_AT_SCAN = {
    "broken/empty.jpg": "empty file",
    "broken/random_bytes.jpg": "UnidentifiedImageError",
    "broken/saved_page.jpg": "UnidentifiedImageError",  # an HTML page saved as .jpg
    "broken/bomb_1x.png": "MAX_IMAGE_PIXELS",  # 1x..2x the limit: PIL itself only warns
    "broken/bomb_2x.png": "DecompressionBombError",  # above 2x: PIL raises
    "broken/dangling.jpg": "dangling symlink",
    "broken/self_loop.jpg": "Too many levels of symbolic links",
    "broken/fifo.jpg": "not a regular file",  # opening it would block forever
}
BROKEN_AT_READ = {
    "broken/truncated.jpg": "decode failed at read time",  # a half-downloaded photo
    "broken/truncated.png": "decode failed at read time",
    "changed/garbage_after_scan.jpg": "decode failed at read time",
    "changed/truncated_after_scan.jpg": "decode failed at read time",
    "changed/deleted_after_scan.png": "FileNotFoundError",
}
BROKEN = {**BROKEN_AT_SCAN, **BROKEN_AT_READ}
PHOTOS = ("photos/china.jpg", "photos/flower.png", "photos/grace_hopper.jpg",
          "photos/fmnist_0.png", "photos/fmnist_1.png", "photos/fmnist_2.png")
ODD_USABLE = ("odd/cmyk.jpg", "odd/gray16.png", "odd/rgb16.png", "odd/rgba.png",
              "odd/palette_transparent.png", "odd/animated.gif", "odd/one_pixel.png",
              "odd/tall_1x3000.png", "odd/wide_3000x1.png", "odd/jpeg_named.png",
              "odd/corrupt_exif.jpg", f"odd/{UNICODE_NAME}", f"odd/{NON_UTF8_NAME}")


# --- building the folder -----------------------------------------------------------------

def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=95, **kwargs)
  return buffer.getvalue()


def png_bytes(image: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, "PNG", **kwargs)
  return buffer.getvalue()


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
  """A PNG written by hand: PIL cannot save 16-bit RGB, nor a bomb without its pixels."""
  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  compressor = zlib.compressobj(9)
  idat = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()
  header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) +
          chunk(b"IEND", b""))


def bomb(side: int) -> bytes:
  """A real 1-bit black PNG of side x side pixels: a few kB on disk, side² pixels decoded."""
  row = bytes((side + 7) // 8)
  return raw_png(side, side, 1, 0, (row for _ in range(side)))


@pytest.fixture(scope="module")
def pixels():
  """The source arrays of every usable file, to compare the decoded images with."""
  china, flower = load_sample_images().images
  grace_path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
  with Image.open(grace_path) as grace:
    grace_array = np.asarray(grace.convert("RGB"))
  with open(grace_path, "rb") as f:
    grace_file = f.read()
  fmnist = load_fashion_mnist("test").images(np.arange(5))[..., 0]
  gradient = np.tile(np.arange(256, dtype=np.uint16) * 257, (64, 1))  # 0..65535 along x
  long_axis = np.round(np.arange(3000) * 255 / 2999).astype(np.uint8)
  banner = np.stack([long_axis, 255 - long_axis, np.full(3000, 40, np.uint8)], axis=-1)
  rgba = np.zeros((48, 48, 4), np.uint8)
  rgba[:, :24, :3] = np.random.default_rng(0).integers(0, 256, (48, 24, 3))  # invisible noise
  rgba[:, 24:, :3] = flower[200:248, 300:324]
  rgba[:, 24:, 3] = 255
  palette = np.zeros((32, 32), np.uint8)  # 0 = transparent background
  palette[8:24, 4:16], palette[8:24, 16:28] = 1, 2  # a red and a blue block
  return {
      "china": china[60:252, 100:356], "flower": flower[100:220, 150:310],
      "grace": grace_array, "grace_file": grace_file, "fmnist": fmnist,
      "gradient16": gradient, "rgb16": flower[150:214, 200:264], "rgba": rgba,
      "palette": palette, "banner": banner, "pixel": np.array([[[200, 30, 60]]], np.uint8),
      "bomb_1x": bomb(10_000), "bomb_2x": bomb(14_000),  # 1.0e8 and 1.96e8 pixels
  }


def build_folder(root, px) -> str:
  """Writes the folder (``root/data``) and returns its path."""
  data = root / "data"
  for sub in ("photos", "odd", "broken", "changed"):
    (data / sub).mkdir(parents=True)
  # Real photos.
  (data / "photos/china.jpg").write_bytes(jpeg_bytes(Image.fromarray(px["china"])))
  (data / "photos/flower.png").write_bytes(png_bytes(Image.fromarray(px["flower"])))
  (data / "photos/grace_hopper.jpg").write_bytes(px["grace_file"])
  for i in range(3):
    (data / f"photos/fmnist_{i}.png").write_bytes(png_bytes(Image.fromarray(px["fmnist"][i])))
  # Usable oddities.
  (data / "odd/cmyk.jpg").write_bytes(jpeg_bytes(Image.fromarray(px["china"]).convert("CMYK")))
  (data / "odd/gray16.png").write_bytes(png_bytes(Image.fromarray(px["gradient16"])))
  rgb16 = px["rgb16"].astype(">u2") * 257
  (data / "odd/rgb16.png").write_bytes(raw_png(64, 64, 16, 2, (row.tobytes() for row in rgb16)))
  (data / "odd/rgba.png").write_bytes(png_bytes(Image.fromarray(px["rgba"], "RGBA")))
  palette = Image.fromarray(px["palette"], "P")
  palette.putpalette([0, 255, 0, 255, 0, 0, 0, 0, 255])  # background green, but transparent
  (data / "odd/palette_transparent.png").write_bytes(png_bytes(palette, transparency=0))
  frames = [Image.fromarray(image) for image in px["fmnist"][2:5]]
  buffer = io.BytesIO()
  frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
  (data / "odd/animated.gif").write_bytes(buffer.getvalue())
  (data / "odd/one_pixel.png").write_bytes(png_bytes(Image.fromarray(px["pixel"])))
  tall = np.ascontiguousarray(px["banner"][:, None, :])  # 3000 high, 1 wide
  (data / "odd/tall_1x3000.png").write_bytes(png_bytes(Image.fromarray(tall)))
  (data / "odd/wide_3000x1.png").write_bytes(png_bytes(Image.fromarray(px["banner"][None])))
  (data / "odd/jpeg_named.png").write_bytes(px["grace_file"])
  (data / "odd/corrupt_exif.jpg").write_bytes(  # an IFD pointing far past the end
      jpeg_bytes(Image.fromarray(px["china"]), exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"))
  (data / "odd" / UNICODE_NAME).write_bytes(jpeg_bytes(Image.fromarray(px["china"])))
  with open(os.path.join(str(data / "odd"), NON_UTF8_NAME), "wb") as f:
    f.write(png_bytes(Image.fromarray(px["flower"])))
  os.symlink("..", data / "odd" / "loop")  # odd/loop/odd/loop/... must be walked once
  # Broken at scan time.
  (data / "broken/empty.jpg").write_bytes(b"")
  (data / "broken/random_bytes.jpg").write_bytes(np.random.default_rng(1).bytes(4000))
  (data / "broken/saved_page.jpg").write_text(
      "<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
      "<body><h1>Forbidden</h1></body></html>\n")
  (data / "broken/bomb_1x.png").write_bytes(px["bomb_1x"])
  (data / "broken/bomb_2x.png").write_bytes(px["bomb_2x"])
  os.symlink("moved_away.jpg", data / "broken/dangling.jpg")
  os.symlink("self_loop.jpg", data / "broken/self_loop.jpg")
  os.mkfifo(data / "broken/fifo.jpg")
  # Broken at read time: the header is fine, the data is not.
  (data / "broken/truncated.jpg").write_bytes(px["grace_file"][:len(px["grace_file"]) // 2])
  flower_png = png_bytes(Image.fromarray(px["flower"]))
  (data / "broken/truncated.png").write_bytes(flower_png[:len(flower_png) // 2])
  # Fine at scan time; changed by `change_after_scan`.
  for name in ("garbage_after_scan.jpg", "truncated_after_scan.jpg"):
    (data / "changed" / name).write_bytes(jpeg_bytes(Image.fromarray(px["china"])))
  (data / "changed/deleted_after_scan.png").write_bytes(flower_png)
  return str(data)


def change_after_scan(root: str) -> None:
  """What a sync job or a user does to the folder while a run reads it."""
  with open(os.path.join(root, "changed/garbage_after_scan.jpg"), "wb") as f:
    f.write(np.random.default_rng(2).bytes(3000))
  path = os.path.join(root, "changed/truncated_after_scan.jpg")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  os.remove(os.path.join(root, "changed/deleted_after_scan.png"))


def expected_view(array, size=SIZE):
  """The central square resized to ``size``: what the source promises for any image."""
  height, width = array.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image = Image.fromarray(np.ascontiguousarray(array))
  view = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR,
                                 box=(left, top, left + side, top + side)))
  return view if view.ndim == 3 else np.repeat(view[..., None], 3, axis=-1)


def rel(source, path):
  return os.path.relpath(path, source.root)


@pytest.fixture
def folder(tmp_path, pixels):
  return build_folder(tmp_path, pixels)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory, pixels):
  """Every image of an unchanged breakage folder, read once: ``{relative path: image}``."""
  root = build_folder(tmp_path_factory.mktemp("breakage"), pixels)
  source = ImageFolderSource(root, SIZE)
  batch = source.images(np.arange(len(source)))
  return {rel(source, path): image.astype(int) for path, image in zip(source.paths, batch)}


# --- the folder as a whole ---------------------------------------------------------------

def test_scan_keeps_usable_files_once_and_skips_broken_headers(folder):
  source = ImageFolderSource(folder, SIZE)
  names = [rel(source, path) for path in source.paths]
  assert sorted(names) == sorted(PHOTOS + ODD_USABLE + tuple(BROKEN_AT_READ))
  assert len(set(names)) == len(names) and not any("loop" in name for name in names)
  skipped = {rel(source, path): reason for path, reason in source.skipped}
  assert set(skipped) == set(BROKEN_AT_SCAN)
  for name, words in BROKEN_AT_SCAN.items():
    assert words in skipped[name], (name, skipped[name])
  assert source.num_scan_skipped == len(BROKEN_AT_SCAN) and source.num_read_failures == 0


def test_reading_everything_skips_each_broken_kind_once_and_reports_it(folder):
  source = ImageFolderSource(folder, SIZE)
  change_after_scan(folder)
  batch = source.images(np.arange(len(source)))
  assert batch.shape == (len(source), SIZE, SIZE, 3) and batch.dtype == np.uint8
  skipped = {rel(source, path): reason for path, reason in source.skipped}
  assert len(source.skipped) == len(BROKEN) == len(skipped)
  assert set(skipped) == set(BROKEN)
  for name, words in BROKEN_AT_READ.items():
    assert words in skipped[name], (name, skipped[name])
  assert source.num_read_failures == len(BROKEN_AT_READ)
  usable = len(PHOTOS) + len(ODD_USABLE)
  assert (f"{usable} usable images, {len(BROKEN)} skipped ({len(BROKEN_AT_SCAN)} at scan, "
          f"{len(BROKEN_AT_READ)} at read)") in source.report()
  # Each broken row holds the next decodable image of the folder order.
  names = [rel(source, path) for path in source.paths]
  for row, name in enumerate(names):
    if name in BROKEN:
      after = next(i % len(names) for i in range(row + 1, row + len(names))
                   if names[i % len(names)] not in BROKEN)
      np.testing.assert_array_equal(batch[row], batch[after], err_msg=name)
  # Reading again gives the same images and records nothing new.
  np.testing.assert_array_equal(source.images(np.arange(len(source))), batch)
  assert len(source.skipped) == len(BROKEN)


def test_without_header_checks_the_same_files_are_skipped_at_read_time(folder):
  source = ImageFolderSource(folder, SIZE, check_headers=False)
  assert source.num_scan_skipped == 0
  change_after_scan(folder)
  source.images(np.arange(len(source)))  # a FIFO, a bomb or a loop must not hang or crash it
  skipped = {rel(source, path): reason for path, reason in source.skipped}
  assert set(skipped) == set(BROKEN)
  assert "MAX_IMAGE_PIXELS" in skipped["broken/bomb_1x.png"]
  assert "not a regular file" in skipped["broken/fifo.jpg"]


def test_a_substitute_that_breaks_later_is_replaced_in_turn(folder, pixels):
  source = ImageFolderSource(folder, SIZE)
  names = [rel(source, path) for path in source.paths]
  truncated = names.index("broken/truncated.jpg")
  first = source.images(np.array([truncated]))[0]
  after = names.index("broken/truncated.png") + 1  # truncated.png is broken too
  np.testing.assert_array_equal(first, source.images(np.array([after]))[0])
  os.remove(source.paths[after])  # the substitute disappears
  second = source.images(np.array([truncated]))[0]
  np.testing.assert_array_equal(second, source.images(np.array([after + 1]))[0])
  assert not np.array_equal(first, second)


# --- usable images decode to the right pixels ------------------------------------------

def test_real_photos(decoded, pixels):
  np.testing.assert_array_equal(decoded["photos/flower.png"], expected_view(pixels["flower"]))
  for i in range(3):
    np.testing.assert_array_equal(decoded[f"photos/fmnist_{i}.png"],
                                  expected_view(pixels["fmnist"][i]))
  # JPEGs (decoded in draft mode) are close to the view of the full-size pixels.
  assert np.abs(decoded["photos/china.jpg"] - expected_view(pixels["china"])).mean() < 8
  assert np.abs(decoded["photos/grace_hopper.jpg"] - expected_view(pixels["grace"])).mean() < 8
  assert np.abs(decoded["photos/china.jpg"] - decoded["photos/grace_hopper.jpg"]).mean() > 20


def test_cmyk_jpeg_has_its_rgb_colours(decoded, pixels):
  cmyk = decoded["odd/cmyk.jpg"]
  assert np.abs(cmyk - expected_view(pixels["china"])).mean() < 10
  assert np.abs(cmyk - decoded["photos/china.jpg"]).mean() < 10  # not inverted


def test_16bit_grayscale_keeps_its_gradient(decoded):
  gray = decoded["odd/gray16.png"]
  # 0..65535 along x becomes 0..255, not "everything above 255 is white".
  np.testing.assert_array_equal(gray, expected_view(np.tile(np.arange(256, dtype=np.uint8),
                                                            (64, 1))))
  assert gray[:, 0].max() < 100 and gray[:, -1].min() > 155
  assert np.all(np.diff(gray[..., 0], axis=1) > 0)


def test_16bit_rgb_keeps_its_colours(decoded, pixels):
  np.testing.assert_array_equal(decoded["odd/rgb16.png"], expected_view(pixels["rgb16"]))


def test_transparent_pixels_become_white(decoded, pixels):
  composite = pixels["rgba"][..., :3].copy()
  composite[:, :24] = 255  # the invisible noise is not shown
  np.testing.assert_array_equal(decoded["odd/rgba.png"], expected_view(composite))
  colours = np.array([[255, 255, 255], [255, 0, 0], [0, 0, 255]], np.uint8)  # not green
  np.testing.assert_array_equal(decoded["odd/palette_transparent.png"],
                                expected_view(colours[pixels["palette"]]))


def test_animated_gif_gives_its_first_frame(decoded, pixels):
  gif = decoded["odd/animated.gif"]
  np.testing.assert_array_equal(gif, expected_view(pixels["fmnist"][2]))
  assert np.abs(gif - expected_view(pixels["fmnist"][3])).mean() > 10


def test_one_pixel_image_fills_the_square(decoded):
  assert np.all(decoded["odd/one_pixel.png"] == [200, 30, 60])


def test_1x3000_banners_give_their_central_pixel(decoded, pixels):
  centre = pixels["banner"][1499].astype(int)  # the central 1x1 square
  for name in ("odd/tall_1x3000.png", "odd/wide_3000x1.png"):
    assert np.abs(decoded[name] - centre).max() <= 1, name


def test_extreme_aspect_ratio_is_cropped_before_resizing(folder, monkeypatch):
  """Memory stays O(SIZE²): no SIZE x 72000 intermediate for a 1x3000 banner."""
  requested = []
  resize = Image.Image.resize

  def spy(self, size, *args, **kwargs):
    requested.append(tuple(size))
    return resize(self, size, *args, **kwargs)

  monkeypatch.setattr(Image.Image, "resize", spy)
  source = ImageFolderSource(folder, SIZE)
  names = [rel(source, path) for path in source.paths]
  source.images(np.array([names.index("odd/tall_1x3000.png"), names.index("odd/wide_3000x1.png")]))
  assert requested and max(max(size) for size in requested) <= SIZE, requested


def test_odd_file_names_and_extensions(decoded, pixels):
  assert np.abs(decoded[f"odd/{UNICODE_NAME}"] - expected_view(pixels["china"])).mean() < 8
  np.testing.assert_array_equal(decoded[f"odd/{NON_UTF8_NAME}"], expected_view(pixels["flower"]))
  # Unreadable EXIF (no orientation to apply) does not make a photo unusable.
  assert np.abs(decoded["odd/corrupt_exif.jpg"] - expected_view(pixels["china"])).mean() < 8
  # A JPEG named .png is read by its content.
  assert np.abs(decoded["odd/jpeg_named.png"] - expected_view(pixels["grace"])).mean() < 8


def test_grayscale_source_scales_16bit_and_composites_alpha(folder, pixels):
  source = ImageFolderSource(folder, SIZE, channels=1)
  names = [rel(source, path) for path in source.paths]
  gray16, rgba = source.images(np.array([names.index("odd/gray16.png"),
                                         names.index("odd/rgba.png")]))
  np.testing.assert_array_equal(gray16[..., 0], expected_view(
      np.tile(np.arange(256, dtype=np.uint8), (64, 1)))[..., 0])
  left = rgba[:, :SIZE // 2 - 1, 0]  # the transparent half, away from the edge
  assert np.all(left == 255)
