"""Shared test helpers: the repo on sys.path, and a runner for multi-device subprocesses.

JAX fixes the number of host devices when it starts, so "the same computation on 8
devices" runs in a fresh Python process with ``--xla_force_host_platform_device_count``.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


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
  """A ``config.data`` for the long-tailed Fashion-MNIST, with ``fields`` overridden."""
  import ml_collections
  config = ml_collections.ConfigDict(dict(
      name="fashion_mnist_longtail", data_dir="", imbalance_ratio=10.0, image_size=28,
      max_train_images=0))
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
