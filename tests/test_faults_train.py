"""Faults on the trainer's side (issue 15): each one a short reproduction, then what must happen instead.

Divergence stops the run before a save and keeps the last finite step; a corrupt or partial checkpoint step is
named with the way back (and set aside when asked); another architecture or batch size is named by its config
key; a second trainer on a directory is refused; the metrics JSONL shows each step once after a resume; files are
written with the umask's mode. Every CLI failure is one line on stderr and exit status 1.

The runs that train go through the CLI with a persistent XLA cache (the same config compiles once); the ones that
must stop before training call `train.main` in this process.
"""
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from o1jax import checkpoint, files, train
from o1jax.training import divergence, logger

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = f"--config={ROOT / 'configs' / 'tiny_cpu.py'}"
STEPS, EVERY = 10, 5
LOSSES = ("loss", "loss_ctr", "loss_gen", "acc_top1", "grad_norm")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


def args(ckpt: pathlib.Path, *overrides: str, jsonl: pathlib.Path | None = None) -> list[str]:
  return [TINY, f"--config.train.steps={STEPS}", "--config.log.every=1", "--config.log.tensorboard_dir=",
          f"--config.log.jsonl={jsonl or ''}", f"--config.checkpoint.dir={ckpt}", f"--config.checkpoint.every={EVERY}",
          "--config.checkpoint.keep=2", *overrides]


def cli(cache: pathlib.Path, *argv: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.run([sys.executable, "-m", "o1jax.train", *argv], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def last_line(proc: subprocess.CompletedProcess) -> str:
  """The CLI's error: exit status 1 and one line, no traceback."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc.stderr.strip().splitlines()[-1]


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def steps_in(ckpt: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compile_cache):
  """A finished tiny_cpu run (checkpoints at steps 5 and 10) and its metrics per step."""
  tmp = tmp_path_factory.mktemp("trained")
  proc = cli(compile_cache, *args(tmp / "ckpt", jsonl=tmp / "metrics.jsonl"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert steps_in(tmp / "ckpt") == [5, 10]
  return tmp / "ckpt", {h["step"]: h for h in read_jsonl(tmp / "metrics.jsonl")}


@pytest.fixture
def ckpt_copy(trained, tmp_path) -> pathlib.Path:
  shutil.copytree(trained[0], tmp_path / "ckpt")
  return tmp_path / "ckpt"


def flip_bytes(step_dir: pathlib.Path, count: int = 64) -> None:
  """Flips `count` bytes in the middle of the largest file of the step's `state/`, as a bad disk would. The arrays
  are zstd-compressed, so the flip either breaks a chunk (orbax cannot read it) or decodes to other values (only
  the checksums see it), depending on where the chunks happen to lie in that file."""
  path = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for i in range(middle, middle + count):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def rewrite_one_value(step_dir: pathlib.Path, array: str = "params.norm.weight") -> None:
  """Changes one value of `array` through tensorstore: storage that decodes fine but returns other numbers, which
  only the checksums can tell."""
  stored = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{step_dir / 'state'}"},
                    "path": array}).result()
  stored[0].write(stored[0].read().result() + 1).result()


# ---------------------------------------------------------------- divergence

def test_divergence_stops_before_a_save_and_keeps_the_last_finite_step(tmp_path, compile_cache):
  # A save every step and keep=1: the first non-finite step (3: the log warmup's first real update, at lr 1e20,
  # overflows the next forward pass) would replace the last finite one if it were saved.
  proc = cli(compile_cache, *args(tmp_path / "ckpt", "--config.optim.lr=1e20", "--config.checkpoint.every=1",
                                  "--config.checkpoint.keep=1", "--config.train.steps=20"))
  line = last_line(proc)
  assert line.startswith("step 3: training diverged (loss=nan, grad_norm=nan)"), line
  assert "nothing after step 2 was saved" in line and "config.optim.lr" in line
  assert steps_in(tmp_path / "ckpt") == [2]
  # lr 1e39 is infinite in float32: finite loss and gradients, but the first update makes the state non-finite.
  proc = cli(compile_cache, *args(tmp_path / "state", "--config.optim.lr=1e39", "--config.checkpoint.every=1"))
  line = last_line(proc)
  assert line.startswith("step 1: training diverged (NaN or infinite values in "), line
  assert steps_in(tmp_path / "state") == []


def test_the_guard_names_the_first_non_finite_step_without_fetching_every_step():
  guard = divergence.DivergenceGuard()
  for step, loss, grad_norm in ((1, 2.0, 1.0), (2, 1.5, np.inf), (3, np.nan, np.nan)):
    guard.observe(step, {"loss": np.float32(loss), "grad_norm": np.float32(grad_norm), "acc_top1": 0.5})
  with pytest.raises(divergence.Diverged, match=r"^step 2: training diverged \(loss=1.5, grad_norm=inf\)"):
    guard.check()
  guard.observe(4, {"loss": np.float32(1.0), "grad_norm": np.float32(1.0)})
  guard.check()  # the steps already reported are not checked again


def test_a_non_finite_state_is_never_saved(tmp_path):
  saver = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
  assert saver.save(1, {"w": jnp.array([1.0, 2.0]), "step": jnp.int32(1)}, {})
  with pytest.raises(checkpoint.NonFiniteState, match=r"refusing to save step 2: NaN or infinite values in 1 "
                                                      r"state array\(s\): w"):
    saver.save(2, {"w": jnp.array([1.0, np.nan]), "step": jnp.int32(2)}, {})
  saver.close()
  assert steps_in(tmp_path) == [1]  # keep=1 removed nothing: no newer step was saved


# ---------------------------------------------------------------- corrupt, partial or mismatched checkpoints

@pytest.mark.parametrize("damage, problem", [
    (flip_bytes, r"(orbax cannot restore it \(.+\)|\d+ array\(s\) differ from what was saved \(checksum mismatch in "
                 r"\S+\))"),
    (rewrite_one_value, r"1 array\(s\) differ from what was saved \(checksum mismatch in params\.norm\.weight\)"),
    (lambda d: (d / "state" / "_METADATA").unlink(), r"its metadata cannot be read"),
])
def test_a_corrupt_or_partial_latest_step_is_named_with_the_way_back(ckpt_copy, damage, problem):
  damage(ckpt_copy / "10")
  with pytest.raises(checkpoint.CorruptStep, match=rf"{ckpt_copy}/10: checkpoint step 10 is corrupt or partial: "
                                                   rf"{problem}.*; to resume from step 5, rerun with "
                                                   r"--config.checkpoint.fallback=True"):
    train.main(args(ckpt_copy))
  assert steps_in(ckpt_copy) == [5, 10]  # nothing deleted


def test_fallback_sets_the_corrupt_step_aside_and_resumes_bitwise_from_the_one_before(trained, ckpt_copy,
                                                                                     compile_cache, tmp_path):
  _, reference = trained
  flip_bytes(ckpt_copy / "10")
  proc = cli(compile_cache, *args(ckpt_copy, "--config.checkpoint.fallback=True", jsonl=tmp_path / "m.jsonl"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 10 is corrupt or partial" in proc.stderr and "falling back to step 5" in proc.stderr
  assert (ckpt_copy / checkpoint.SET_ASIDE_DIR / "10" / "state").is_dir()  # moved, not deleted
  resumed = read_jsonl(tmp_path / "m.jsonl")
  assert [h["step"] for h in resumed] == [6, 7, 8, 9, 10]
  for h in resumed:
    assert all(h[k] == reference[h["step"]][k] for k in LOSSES), h["step"]
  assert steps_in(ckpt_copy) == [5, 10]


def test_an_architecture_change_names_the_config_key(ckpt_copy):
  with pytest.raises(checkpoint.CheckpointError, match=r"10: saved with another state than this config builds "
                                                       r"\(\d+ array\(s\) differ, e.g. params\..*config keys changed "
                                                       r"since: .*config.model.arch.hidden_size: 64 -> 128"):
    train.main(args(ckpt_copy, "--config.model.arch.hidden_size=128", "--config.model.arch.head_dim=32"))
  # The run files still describe the steps beside them: a refused run does not overwrite them.
  assert json.loads((ckpt_copy / "run" / "model_config.json").read_text())["hidden_size"] == 64


@pytest.mark.parametrize("override, message", [
    ("--config.train.batch_queries=8", r"batch_queries saved 16, now 8: .*config.train.batch_queries"),
    ("--config.data.shuffle_seed=1", r"shuffle_seed saved 0, now 1: .*config.data.shuffle_seed"),
    ("--config.data.synthetic.queries_per_doc=3", r"records saved 256, now 192"),
])
def test_another_data_order_is_refused(ckpt_copy, override, message):
  with pytest.raises(checkpoint.CheckpointError, match=message):
    train.main(args(ckpt_copy, override))


# ---------------------------------------------------------------- one trainer per directory

def test_a_second_trainer_is_refused(tmp_path):
  with checkpoint.exclusive(str(tmp_path / "ckpt")):
    holder = (tmp_path / "ckpt" / checkpoint.LOCK_FILE).read_text()
    assert holder.startswith("host ") and f"pid {os.getpid()}" in holder
    with pytest.raises(checkpoint.DirectoryLocked, match=rf"{tmp_path}/ckpt: another trainer is writing this "
                                                         rf"checkpoint directory .*held by host .*, pid {os.getpid()}"):
      train.main(args(tmp_path / "ckpt"))
  assert not (tmp_path / "ckpt" / checkpoint.LOCK_FILE).exists()  # released on exit


def test_the_lock_of_a_dead_trainer_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  lock = tmp_path / checkpoint.LOCK_FILE
  lock.write_text(f"host {os.uname().nodename}, pid {dead.stdout.strip()}\n")  # what a SIGKILLed trainer leaves
  with checkpoint.exclusive(str(tmp_path)):
    assert f"pid {os.getpid()}" in lock.read_text()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
  with pytest.raises(RuntimeError):
    with checkpoint.exclusive(str(tmp_path)):
      raise RuntimeError("the run failed")
  with checkpoint.exclusive(str(tmp_path)):
    pass


# ---------------------------------------------------------------- logs and files

def test_a_resumed_run_logs_each_step_once(tmp_path):
  jsonl = tmp_path / "logs" / "metrics.jsonl"
  first = logger.TrainLogger(20, 0, logger.LogSettings(every=1, jsonl=str(jsonl)))
  for step in range(1, 14):
    first.log(step, {"loss": np.float32(step)})
  first.close()
  with open(jsonl, "a", encoding="utf-8") as f:
    f.write('{"loss": 14.0, "st')  # a line cut short by SIGKILL
  resumed = logger.TrainLogger(20, 10, logger.LogSettings(every=1, jsonl=str(jsonl)))  # checkpoint at step 10
  for step in range(11, 21):
    resumed.log(step, {"loss": np.float32(step + 0.5)})
  resumed.close()
  lines = read_jsonl(jsonl)
  assert [h["step"] for h in lines] == list(range(1, 21))
  assert [h["loss"] for h in lines[9:11]] == [10.0, 11.5]


def test_atomic_writes_get_the_umask_mode_and_keep_an_existing_mode(tmp_path):
  umask = os.umask(0o022)
  try:
    files.atomic_write_text(tmp_path / "new.json", "{}")
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
    (tmp_path / "private").write_text("x")
    (tmp_path / "private").chmod(0o600)
    files.atomic_write_text(tmp_path / "private", "y")
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
  finally:
    os.umask(umask)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "private"]  # no temporary left behind
