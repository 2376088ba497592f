"""Errors of the data package."""
from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are not where the config says (or anywhere searched).

  A ``FileNotFoundError`` so that generic "missing file" handling catches it;
  the message names the paths tried and the fix (install it or set
  ``config.data.data_dir``).
  """
