"""`python -m o1jax.train`: tiny_cpu lowers both losses; kill + resume reproduces every later loss bitwise;
bad configs fail before compiling; the Mistral-7B pod recipe lowers and compiles on 8 fake devices (shape only).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from o1jax import checkpoint, config as o1config
from o1jax import sharding, train
from o1jax.training.trainer import shape_only_trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = f"--config={ROOT / 'configs' / 'tiny_cpu.py'}"
STEPS = 120  # the LR schedule depends on it, so every run below uses the same value
LOSSES = ("loss", "loss_ctr", "loss_gen", "acc_top1", "grad_norm")


def run_args(tmp_path: pathlib.Path, name: str, ckpt: pathlib.Path | None) -> list[str]:
  return [TINY, f"--config.train.steps={STEPS}", "--config.log.every=1", "--config.log.tensorboard_dir=",
          f"--config.log.jsonl={tmp_path / name}.jsonl", f"--config.checkpoint.dir={ckpt or ''}",
          "--config.checkpoint.every=5"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache shared by this file's runs: the step compiles once instead of once per process."""
  return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache):
  """An uninterrupted run of the CLI: the metrics of every step."""
  tmp = tmp_path_factory.mktemp("reference")
  proc = start(tmp, "ref", None, compile_cache)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  return {int(h["step"]): h for h in read_jsonl(tmp / "ref.jsonl")}


def read_jsonl(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start(tmp_path, name, ckpt, compile_cache):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(compile_cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.Popen([sys.executable, "-m", "o1jax.train", *run_args(tmp_path, name, ckpt)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_after(proc, jsonl: pathlib.Path, lines: int, signum: int) -> None:
  """Sends `signum` once the run has logged `lines` steps; fails if it ends first."""
  while len(read_jsonl(jsonl)) < lines:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.02)
  proc.send_signal(signum)


def test_tiny_cpu_lowers_both_losses(reference):
  steps = sorted(reference)
  assert steps == list(range(1, STEPS + 1))
  for key in ("loss_ctr", "loss_gen"):
    first = np.mean([reference[s][key] for s in steps[:10]])
    last = np.mean([reference[s][key] for s in steps[-10:]])
    assert last < 0.7 * first, (key, first, last)
  assert np.mean([reference[s]["acc_top1"] for s in steps[-10:]]) > np.mean(
      [reference[s]["acc_top1"] for s in steps[:10]])


def test_kill_and_resume_reproduce_every_loss_bitwise(tmp_path, reference, compile_cache):
  ckpt = tmp_path / "ckpt"
  killed = start(tmp_path, "killed", ckpt, compile_cache)
  signal_after(killed, tmp_path / "killed.jsonl", 13, signal.SIGKILL)  # no chance to save: resume from step 5/10
  killed.wait()
  assert killed.returncode == -signal.SIGKILL

  resumed = start(tmp_path, "resumed", ckpt, compile_cache)
  signal_after(resumed, tmp_path / "resumed.jsonl", 8, signal.SIGTERM)  # preemption: saves at a step boundary
  _, stderr = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, stderr[-3000:]
  assert "SIGTERM at step" in stderr and "resumed from" in stderr

  killed_log, resumed_log = read_jsonl(tmp_path / "killed.jsonl"), read_jsonl(tmp_path / "resumed.jsonl")
  first_resumed = resumed_log[0]["step"]
  assert first_resumed in (6, 11)  # the step after the last complete checkpoint
  assert first_resumed <= killed_log[-1]["step"] + 1
  for entry in killed_log + resumed_log:
    for key in LOSSES:
      assert entry[key] == reference[entry["step"]][key], (entry["step"], key)
  # The SIGTERM checkpoint holds the last step done, so a third start would continue from there.
  manager = checkpoint.Checkpointer(str(ckpt), every=5, keep=2)
  assert manager.latest_step() == resumed_log[-1]["step"]
  manager.close()


@pytest.mark.parametrize("override, message", [
    ("--config.train.group_size=1", "config.train.group_size=1: must be >= 2"),
    ("--config.train.batch_queries=12", "is not divisible by the mesh's data\\*fsdp = 8"),
    ("--config.train.stepz=1", "stepz"),
])
def test_bad_configs_fail_before_compiling(override, message):
  with pytest.raises(o1config.ConfigError, match=message):
    train.main([TINY, override])


def test_cli_exits_with_the_message():
  proc = subprocess.run([sys.executable, "-m", "o1jax.train", TINY, "--config.train.lengths.doc=1"], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
  assert proc.returncode == 1
  assert "config.train.lengths.doc=1 cannot hold the document template" in proc.stderr


def compile_recipe(name: str, *overrides: str):
  config = o1config.load([f"--config={ROOT / 'configs' / name}", *overrides])
  run = o1config.settings(config)
  trainer = shape_only_trainer(run.model, run.data, run.trainer, sharding.make_mesh(config.mesh))
  return trainer.lower_step(trainer.abstract_state_with_shardings(), run.batch.shape().abstract(trainer.mesh)).compile()


@pytest.mark.e2e
def test_mistral7b_lora_recipe_compiles_on_8_devices_reduced_depth():
  """Full depth (91 s here): `python -m o1jax.aot --config=configs/mistral7b.py --topology=cpu-8`; depth barely
  changes compile time (scanned layers)."""
  compiled = compile_recipe("mistral7b.py:lora", "--config.model.arch.num_hidden_layers=2")
  assert compiled.cost_analysis() is not None
