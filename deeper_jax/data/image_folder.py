"""Uncurated image folders: any tree of image files, labels optional.

This is the "bring your own YFCC" path: a folder tree of photos of any size,
format and quality. Decisions, and why:

* **Deterministic order.** Files are sorted by their path relative to
  ``root`` (compared folder by folder), so image ``i`` is the same file on
  every host and every run — the sampler's indices and the checkpointed
  cluster assignments refer to it.
* **Corrupt files are data, not bugs.** Uncurated collections always hold some
  broken files. Files that PIL cannot even identify (random bytes, HTML saved
  as .jpg, empty files), dangling symlinks, non-regular files (FIFOs) and
  decompression bombs (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels) are
  dropped at scan time — a header read, cheap — and listed in ``skipped``.
  Files that identify but fail to decode later (truncated JPEGs, files changed
  or deleted after the scan) are handled at read time: the image is replaced by
  the next decodable image of the folder order (of the same class when
  labelled), the file is added to ``skipped``, and a warning is logged. The
  replacement depends only on which files decode, so it is the same on every
  host. Nothing a file contains can stop a run (tests/test_image_folder_breakage.py).
* **Labels only when asked.** ``labels_from_subdirs=True`` maps the first
  sub-folder under ``root`` to a class id (sorted names, like torchvision's
  ImageFolder); pre-training never reads labels.
* **One fixed size.** Decoded to RGB (or grayscale with ``channels=1``),
  shorter side resized to ``image_size``, centre-cropped to a square.
* Hidden files and folders (names starting with '.') are ignored, as are files
  whose extension is not an image extension.
"""
from __future__ import annotations

import os
import stat
import threading
from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image

from deeper_jax.data import imaging
from deeper_jax.errors import DatasetNotFoundError
from deeper_jax.data.sources import SubsetSource, as_indices

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                      ".ppm", ".pgm")


def _walk(root: str, extensions: tuple[str, ...]) -> tuple[list[str], int]:
  """Image-extension files under ``root`` sorted by relative path, and how many others were ignored.

  Follows symlinked folders (shared photo stores often use them) but visits each
  real folder once, so a link cycle cannot loop.
  """
  files, ignored, seen = [], 0, set()
  for directory, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(directory)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if name.startswith("."):
        continue
      if name.lower().endswith(extensions):
        files.append(os.path.join(directory, name))
      else:
        ignored += 1
  # One global order by path components (walk order would put a folder's own
  # files before its sub-folders' regardless of names).
  files.sort(key=lambda path: os.path.relpath(path, root).split(os.sep))
  return files, ignored


def _header_problem(path: str) -> str | None:
  """Why ``path`` is not a usable image judging from its header, or ``None``."""
  try:
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
      return "not a regular file"
    if info.st_size == 0:
      return "empty file"
    with Image.open(path) as image:
      width, height = image.size
      if width <= 0 or height <= 0:
        return f"invalid size {image.size}"
      imaging.check_pixels(image)
  except FileNotFoundError as e:
    if os.path.islink(path):
      return f"dangling symlink to {os.readlink(path)!r}"
    return f"{type(e).__name__}: {e}"
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
    return f"{type(e).__name__}: {e}"
  return None


class ImageFolderSource:
  """Random access to the images under ``root``, decoded to ``[image_size, image_size, C]``.

  Args:
    root: the folder to scan recursively (``config.data.data_dir``).
    image_size: side of the square images returned.
    labels_from_subdirs: class id = index of the first-level sub-folder name in
      ``class_names``; files directly in ``root`` are then skipped.
    channels: 3 (RGB) or 1 (grayscale).
    extensions: lower-case file extensions that count as images.
    class_names: fixes the name → id mapping (e.g. a test folder reuses the
      train folder's classes); default: sorted sub-folders holding image files.
    check_headers: open every file's header at scan time (cheap) to drop
      non-images before training; ``False`` for huge trees on slow storage
      (broken files are then all handled at read time).
    num_threads: decode threads per ``images()`` call (PIL releases the GIL).
  """

  decodes_files = True  # the input pipeline's 'auto' decodes it in worker processes

  def __init__(self, root: str, image_size: int, *, labels_from_subdirs: bool = False,
               channels: int = 3, extensions: Sequence[str] = DEFAULT_EXTENSIONS,
               class_names: Sequence[str] | None = None, check_headers: bool = True,
               num_threads: int = 4):
    if not root or not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"image folder {root!r} is not a directory; set config.data.data_dir to the folder "
          "of images to pre-train on.")
    if image_size <= 0:
      raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    imaging.pil_mode(channels)  # validates 1 or 3
    extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not extensions:
      raise ValueError("extensions must list at least one file extension, e.g. ('.jpg',).")
    self.root: str = root
    self._size, self._channels = int(image_size), channels
    self._threads = imaging.DecodeThreads(num_threads)
    self.skipped: list[tuple[str, str]] = []
    candidates, self.num_ignored = _walk(root, extensions)

    class_of_file: list[str | None] = [None] * len(candidates)
    if labels_from_subdirs:
      for i, path in enumerate(candidates):
        parts = os.path.relpath(path, root).split(os.sep)
        class_of_file[i] = parts[0] if len(parts) > 1 else None
      if class_names is None:
        class_names = sorted({c for c in class_of_file if c is not None})
    elif class_names is not None:
      raise ValueError("class_names needs labels_from_subdirs=True.")
    self.class_names: tuple[str, ...] | None = None if class_names is None else tuple(class_names)
    class_id = {name: i for i, name in enumerate(self.class_names or ())}

    paths, labels = [], []
    for path, cls in zip(candidates, class_of_file):
      if labels_from_subdirs and cls is None:
        self.skipped.append((path, "not inside a class sub-folder (labels_from_subdirs=True)"))
        continue
      if labels_from_subdirs and cls not in class_id:
        self.skipped.append((path, f"class folder {cls!r} not in class_names"))
        continue
      problem = _header_problem(path) if check_headers else None
      if problem is not None:
        self.skipped.append((path, problem))
        continue
      paths.append(path)
      if labels_from_subdirs:
        labels.append(class_id[cls])
    self.num_scan_skipped = len(self.skipped)
    if not paths:
      first = f" (first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
      raise DatasetNotFoundError(
          f"no readable images with extensions {' '.join(extensions)} under {root!r}; "
          f"{len(self.skipped)} skipped{first}, {self.num_ignored} other files ignored.")
    self.paths: tuple[str, ...] = tuple(paths)
    self._labels = np.asarray(labels, np.int32) if labels_from_subdirs else None
    if self._labels is not None:
      self._labels.setflags(write=False)
    self._bad: set[int] = set()  # indices found undecodable at read time
    self._read_failures: list[tuple[int, str]] = []  # (index, reason), in the order found
    self._substitute: dict[int, int] = {}
    self._lock = threading.Lock()
    (logging.warning if self.skipped else logging.info)("%s", self.report())

  # --- the source interface -------------------------------------------------

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images(np.asarray([index]))[0]

  def images(self, indices) -> np.ndarray:
    indices = as_indices(indices, len(self))
    out = np.empty((len(indices),) + self.image_shape, np.uint8)
    results = self._threads.map(self._try_decode, indices.tolist())
    for row, (index, image) in enumerate(zip(indices.tolist(), results)):
      out[row] = image if image is not None else self._decode_substitute(index)
    return out

  @property
  def labels(self) -> np.ndarray | None:
    return self._labels

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self._size, self._size, self._channels)

  @property
  def num_classes(self) -> int | None:
    return None if self.class_names is None else len(self.class_names)

  def subset(self, indices) -> SubsetSource:
    return SubsetSource(self, indices)

  # --- failures -------------------------------------------------------------

  @property
  def num_read_failures(self) -> int:
    """Files that passed the scan but failed to decode when read."""
    return len(self._bad)

  def report(self) -> str:
    """One line: how many images, skipped files (with the first reason), ignored files."""
    line = (f"ImageFolderSource({self.root}): {len(self.paths) - len(self._bad)} usable images, "
            f"{len(self.skipped)} skipped ({self.num_scan_skipped} at scan, "
            f"{len(self._bad)} at read)")
    if self.skipped:
      line += f", first: {self.skipped[0][0]}: {self.skipped[0][1]}"
    return line + f"; {self.num_ignored} non-image files ignored."

  def read_failures(self) -> list[tuple[int, str]]:
    """``(index, reason)`` of every file found undecodable at read time, in the order found."""
    return list(self._read_failures)

  def record_read_failures(self, failures) -> None:
    """Records failures another copy of this source found (the input pipeline's workers).

    Afterwards this copy skips those files as if it had failed on them itself (the
    substitutes are the same: they depend only on which files decode).
    """
    for index, reason in failures:
      self._record_failure(int(index), reason)

  def _record_failure(self, index: int, reason: str) -> None:
    with self._lock:
      if index in self._bad:
        return
      self._bad.add(index)
      self._read_failures.append((index, reason))
      self.skipped.append((self.paths[index], reason))
      logging.warning("Skipping undecodable image %s (%s); %s", self.paths[index], reason,
                      self.report())

  def _try_decode(self, index: int) -> np.ndarray | None:
    """The decoded image, or ``None`` (recorded once) if it fails to decode."""
    if index in self._bad:
      return None
    try:
      return imaging.decode_file(self.paths[index], self._size, self._channels)
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
      self._record_failure(index, f"decode failed at read time: {type(e).__name__}: {e}")
      return None

  def _decode_substitute(self, index: int) -> np.ndarray:
    """The first decodable image after ``index`` in folder order (same class if labelled)."""
    if index in self._substitute:
      # The substitute may have broken since (changed on disk): then search again.
      image = self._try_decode(self._substitute[index])
      if image is not None:
        return image
    n = len(self.paths)
    for step in range(1, n):
      other = (index + step) % n
      if self._labels is not None and self._labels[other] != self._labels[index]:
        continue
      image = self._try_decode(other)
      if image is not None:
        self._substitute[index] = other
        return image
    raise RuntimeError(
        f"{self.paths[index]} failed to decode and no other image"
        f"{' of its class' if self._labels is not None else ''} under {self.root} decodes either; "
        f"see .skipped ({len(self.skipped)} entries).")

  # Locks do not pickle (e.g. into the input pipeline's worker processes).
  def __getstate__(self):
    return {**self.__dict__, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"ImageFolderSource({self.root!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})")
