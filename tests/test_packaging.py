"""The package installs as declared: pins agree, and code outside the repository can
import it and load an export."""
import os
import re
import subprocess
import sys
import tomllib

from conftest import REPO


def _pins(lines):
  return dict(re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line.strip()).groups()
              for line in lines if re.match(r"^[A-Za-z0-9_.\-\[\]]+==", line.strip()))


def test_pyproject_and_requirements_pin_the_same_versions():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    requirements = _pins(f)
  runtime = _pins(project["dependencies"])
  tests = _pins(project["optional-dependencies"]["test"])
  for name, version in {**runtime, **tests}.items():
    assert requirements.get(name) == version, (name, version, requirements.get(name))
  assert set(requirements) == set(runtime) | set(tests)


def test_the_installed_package_imports_from_anywhere_without_the_repository_on_the_path(
    tmp_path):
  code = ("import deeper_jax, configs.default as d, inspect; "
          "print(deeper_jax.__file__); print(d.get_config().model.name)")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  path, model = proc.stdout.split()
  assert path.startswith(os.path.join(REPO, "deeper_jax")) and model == "small_cnn28"


def test_no_module_of_the_repository_edits_sys_path():
  offenders = []
  for folder in ("deeper_jax", "configs", "notebooks", "benchmarks"):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for name in files:
        if name.endswith((".py", ".ipynb")):
          with open(os.path.join(root, name), encoding="utf-8") as f:
            if "sys.path.insert" in f.read():
              offenders.append(os.path.join(root, name))
  assert not offenders
