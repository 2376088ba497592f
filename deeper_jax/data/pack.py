"""Packs an image folder into ArrayRecord shards for ``data.name='array_record'``.

  python -m deeper_jax.data.pack --src /data/photos --dst /data/photos_packed --shard_size 4096

Files are scanned exactly as ``ImageFolderSource`` scans them (same order, same
extensions, same header checks), then each file's bytes are read and decoded in full
once: a file that fails (empty, truncated, not an image, ...) is skipped, counted and
listed in ``pack.json`` with its reason, and never reaches a shard, so training never
meets it. Records keep the file's bytes as they were (no re-encoding: the pixels the
source decodes are the folder source's pixels). Layout: ``array_record_source.py``.

The destination must be new or empty: a half-overwritten pack would mix two folders.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import NamedTuple

from absl import logging

from deeper_jax.data import imaging
from deeper_jax.data.array_record_source import INDEX, MANIFEST, encode_record
from deeper_jax.data.image_folder import ImageFolderSource


class PackReport(NamedTuple):
  records: int
  shards: tuple[str, ...]
  skipped: tuple[tuple[str, str], ...]  # (path relative to src, reason)
  ignored: int  # files without an image extension

  def summary(self) -> str:
    line = (f"packed {self.records} images into {len(self.shards)} shards; "
            f"{len(self.skipped)} files skipped")
    if self.skipped:
      line += f" (first: {self.skipped[0][0]}: {self.skipped[0][1]})"
    return line + f"; {self.ignored} non-image files ignored."


def _shard_name(index: int, count: int) -> str:
  return f"images-{index:05d}-of-{count:05d}.array_record"


def _read_verified(path: str) -> bytes:
  """The file's bytes; raises unless they decode in full."""
  with open(path, "rb") as f:
    data = f.read()
  imaging.verify_bytes(data)
  return data


def pack_folder(src: str, dst: str, shard_size: int = 4096) -> PackReport:
  """Writes ``src``'s decodable images as ArrayRecord shards of ``shard_size`` into ``dst``.

  Streams: one file's bytes in memory at a time. Shards are written under temporary
  names and renamed once their count is known.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if shard_size <= 0:
    raise ValueError(f"shard_size must be a positive number of images, got {shard_size}.")
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise FileExistsError(f"--dst {dst!r} exists and is not an empty folder; pack into a new "
                          "folder.")
  scan = ImageFolderSource(src, 1)  # scan only: the order and header checks of the folder
  skipped = [(os.path.relpath(path, src), reason) for path, reason in scan.skipped]
  os.makedirs(dst, exist_ok=True)
  records, partial, writer = 0, [], None
  with open(os.path.join(dst, INDEX), "w") as index:
    for path in scan.paths:
      relative = os.path.relpath(path, src)
      try:
        data = _read_verified(path)
      except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
        skipped.append((relative, f"does not decode: {type(e).__name__}: {e}"))
        continue
      if records % shard_size == 0:
        if writer is not None:
          writer.close()
        partial.append(os.path.join(dst, f"partial-{len(partial):05d}.array_record"))
        # group_size:1: every record is its own chunk, so one access reads one image.
        writer = array_record_module.ArrayRecordWriter(partial[-1], "group_size:1")
      writer.write(encode_record(relative, data))
      index.write(json.dumps([relative, len(data), hashlib.sha1(data).hexdigest()]) + "\n")
      records += 1
  if writer is not None:
    writer.close()
  if not records:
    raise ValueError(f"no image under {src!r} decodes; nothing to pack "
                     f"({len(skipped)} files skipped).")
  shards = tuple(_shard_name(i, len(partial)) for i in range(len(partial)))
  for old, name in zip(partial, shards):
    os.replace(old, os.path.join(dst, name))
  report = PackReport(records, shards, tuple(skipped), scan.num_ignored)
  manifest = {"source": os.path.abspath(src), "records": records, "shard_size": shard_size,
              "shards": list(shards), "skipped": [list(s) for s in report.skipped],
              "ignored": report.ignored}
  with open(os.path.join(dst, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  logging.info("%s", report.summary())
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="the image folder to pack")
  parser.add_argument("--dst", required=True, help="a new (or empty) folder for the shards")
  parser.add_argument("--shard_size", type=int, default=4096, help="images per shard")
  args = parser.parse_args(argv)
  try:
    report = pack_folder(args.src, args.dst, args.shard_size)
  except (OSError, ValueError) as e:
    print(f"deeper_jax.data.pack: error: {e}", file=sys.stderr)
    return 2
  print(report.summary())
  return 0


if __name__ == "__main__":
  sys.exit(main())
