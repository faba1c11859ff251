"""`pip install .` into a fresh virtualenv, then the o1jax-* commands from outside the checkout.

The virtualenv sees this environment's packages (`--system-site-packages`) and the install adds only o1jax and
data_tools (`--no-deps --no-build-isolation`: no network). The package is built from a copy of the checkout's
packaged files, so the build leaves nothing in the checkout. Each command must import the installed package, not
the checkout, and behave as its `python -m` form: the same output and exit status.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = {"o1jax-train": "o1jax.train", "o1jax-eval": "o1jax.eval", "o1jax-mteb": "o1jax.eval.mteb",
           "o1jax-export": "o1jax.export",
           "o1jax-synthesize": "data_tools.synthesize", "o1jax-ingest": "data_tools.ingest",
           "o1jax-mine": "data_tools.mine", "o1jax-score": "data_tools.score", "o1jax-aot": "o1jax.aot",
           "o1jax-convert": "o1jax.convert"}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> pathlib.Path:
  """A virtualenv with the package installed from a copy of the checkout; returns its bin/ directory."""
  tmp = tmp_path_factory.mktemp("packaging")
  source = tmp / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for package in ("o1jax", "data_tools"):
    shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(tmp / "venv")],
                 check=True, timeout=120)
  python = tmp / "venv" / "bin" / "python"
  # pip itself comes from this environment's site-packages; it installs into the virtualenv it runs in.
  subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                  "--quiet", str(source)], check=True, timeout=600, cwd=tmp)
  return tmp / "venv" / "bin"


def run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  return subprocess.run(args, cwd=cwd, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=300)


def test_pyproject_names_every_command_and_its_module():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  scripts = project["scripts"]
  assert sorted(scripts) == sorted(MODULES)
  for script, module in MODULES.items():
    assert scripts[script].split(":")[0] in (module, f"{module}.__main__"), script
  assert set(project["optional-dependencies"]) >= {"tpu", "gpu", "test"}


def test_installed_package_is_imported_from_the_virtualenv(venv, tmp_path):
  proc = run([str(venv / "python"), "-c", "import o1jax, o1jax.export, data_tools; "
              "print(o1jax.__file__); print(data_tools.__file__)"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  for line in proc.stdout.splitlines():
    path = pathlib.Path(line)
    assert path.is_relative_to(venv.parent) and not path.is_relative_to(ROOT), line


@pytest.mark.parametrize("script,args", [
    ("o1jax-train", []),  # no --config: one line, exit status 1
    ("o1jax-eval", ["--help"]),
    ("o1jax-export", ["--checkpoint=no-such-dir", "--out=o"]),  # one line naming the missing run file, status 1
    ("o1jax-synthesize", ["--help"]),
    ("o1jax-ingest", ["--help"]),
    ("o1jax-mteb", ["--help"]),
    ("o1jax-mine", ["--help"]),
    ("o1jax-score", ["--help"]),
    ("o1jax-convert", ["hf-to-hf", "--hf=no-such-dir", "--out=o"]),
    ("o1jax-aot", ["--topology=cpu-1"]),  # no --config: one line, exit status 2
])
def test_command_behaves_as_python_m(venv, tmp_path, script, args):
  command = run([str(venv / script), *args], tmp_path)
  module = run([str(venv / "python"), "-m", MODULES[script], *args], tmp_path)
  assert (command.returncode, command.stdout, command.stderr) == (module.returncode, module.stdout, module.stderr)
  assert "Traceback" not in command.stderr, command.stderr
  assert (command.returncode == 0) == (args == ["--help"]), command.stderr


def test_aot_compiles_a_config_file_of_the_checkout_with_the_installed_package(venv, tmp_path):
  proc = run([str(venv / "o1jax-aot"), "--topology=cpu-1", f"--config={ROOT / 'configs' / 'tiny_cpu.py'}",
              f"--json={tmp_path / 'fit.json'}"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "[train_step]" in proc.stdout and proc.stdout.rstrip().endswith("FITS")
  assert (tmp_path / "fit.json").is_file()
