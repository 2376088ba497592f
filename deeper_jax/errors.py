"""Errors the user fixes: a config field, the data, or the workdir.

``main`` prints their message as one line on stderr and exits with status 2; every
other exception is a bug and keeps its traceback. Each message names what is wrong
and the way out, so that the one line is enough.
"""
from __future__ import annotations


class UserError(Exception):
  """A problem in what the user gave us, not in the code."""


class ConfigError(UserError, ValueError):
  """A config field has a value the run cannot work with."""


class DataError(UserError, ValueError):
  """The data cannot be used as configured (missing, empty, changed, wrong shape)."""


class DatasetNotFoundError(DataError, FileNotFoundError):
  """A dataset's files are not where the config says (or anywhere searched)."""


class WorkdirError(UserError):
  """The workdir cannot be used: another run holds it, or it belongs to another run."""
