"""Shared test helpers: configs derived from the default, real images, and a runner for
multi-device subprocesses.

JAX fixes the number of host devices when it starts, so "the same computation on 8
devices" runs in a fresh Python process with ``--xla_force_host_platform_device_count``.
The package is installed (``pip install -e .``), so no path is inserted here.

Every test process and every job a test launches (they inherit the environment) shares
one persistent XLA compilation cache: the dozens of whole-run launches compile the
same programs, and a cached executable is the one a fresh compile would give, so no
result changes; a launch takes about half the time (41 s → 20 s for configs/tiny.py
on 2 cores). Set ``JAX_COMPILATION_CACHE_DIR`` to choose another place.
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Before anything imports jax (its config reads these when it starts).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "deeper_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
  """``slow``: tests that launch whole jobs for minutes (deselect: ``-m "not slow"``)."""
  config.addinivalue_line("markers", "slow: launches whole jobs; minutes on 2 cores.")


def test_config(base: str = "tiny", **overrides):
  """``configs/<base>.py`` with dotted overrides: ``test_config(**{'train.batch_size': 32})``."""
  import importlib
  config = importlib.import_module(f"configs.{base}").get_config()
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


test_config.__test__ = False  # a helper, not a test


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 600):
  """Runs ``code`` in a subprocess with ``num_devices`` CPU devices.

  The code prints one JSON line last; that line is parsed and returned.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def with_devices():
  return run_with_devices


def fashion_mnist_images(n: int, split: str = "test"):
  """The first ``n`` real Fashion-MNIST images, float32 [n, 28, 28, 1] in [0, 1]."""
  import numpy as np
  from deeper_jax.data import load_fashion_mnist
  return load_fashion_mnist(split).images(np.arange(n)).astype(np.float32) / 255.0


def data_config(**fields):
  """``config.data`` of the default config on long-tailed Fashion-MNIST (the data tests'
  set; the default config trains on the uncurated one), fields overridden."""
  config = test_config("default").data
  config.name = "fashion_mnist_longtail"
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def fmnist_train():
  from deeper_jax.data import load_fashion_mnist
  return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def fmnist_test():
  from deeper_jax.data import load_fashion_mnist
  return load_fashion_mnist("test")
