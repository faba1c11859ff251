"""The README's promises that CI depends on: .ci/run runs the README's test command verbatim."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"^(pip install -r requirements[^\n]*)$", readme, re.M)
  assert commands[:2] == ["pip install -r requirements.txt && python -m o1jax.train --config=configs/tiny_cpu.py",
                          "pip install -r requirements-test.txt && python -m pytest -q tests"]
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert commands[1] in ci
