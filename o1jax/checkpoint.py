"""Orbax checkpoints of the train state and the data position, and preemption signals.

One checkpoint per saved step holds two items: `state` (the sharded pytree: params, LoRA, optimizer state, step,
PRNG key data; every process writes its shards) and `data` (JSON: the next batch index, so resume continues at
the exact same example). Saves are asynchronous: the step loop goes on while orbax writes, and each step
directory appears under its final name only when complete. Paths may be local or `gs://...` (orbax writes
through etils.epath).

Beside the step directories, `run/` holds what rebuilds the model without the training command line: the train
config (`train_config.json`), the model architecture (`model_config.json`) and the tokenizer with the special
tokens (`tokenizer/`), written by process 0 when a run starts (`save_run_files`, read by `load_run_files`).

SIGTERM (preemption) and SIGINT are turned into a flag the loop polls after each step, so it can save a final
checkpoint at a step boundary and exit cleanly.
"""
from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import tempfile
import threading
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import transformers

from o1jax.files import atomic_write_bytes
from o1jax.model import ModelConfig

RUN_DIR = "run"
TRAIN_CONFIG, MODEL_CONFIG, TOKENIZER_DIR = "train_config.json", "model_config.json", "tokenizer"


def _absolute(directory: str) -> str:
  return directory if "://" in directory else os.path.abspath(directory)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """`config.checkpoint`: where (empty: no checkpoints), how often, how many to keep, saved in the background."""
  dir: str = ""
  every: int = 100
  keep: int = 3
  async_save: bool = True


class Checkpointer:
  """`CheckpointManager` keeping the last `keep` checkpoints, saving every `every` steps (or when forced)."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    self.directory, self.every = _absolute(directory), every
    # The schedule is ours (multiples of `every`); orbax's own would also save the first step it sees.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = False) -> bool:
    """Starts saving (in the background when async) if `step` is a multiple of `every` or `force`."""
    if step % self.every and not force:
      return False
    return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, placed as `abstract_state` says (ShapeDtypeStructs with shardings), and its data."""
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_on_host(directory: str, abstract: Any, step: int | None = None) -> tuple[int, Any]:
  """(step, numpy arrays) of the part `abstract` of the saved state, e.g. params and LoRA without the optimizer
  state, whatever mesh or process count saved it. `step` defaults to the latest."""
  directory = _absolute(directory)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoint steps")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; saved steps: {steps}")
    restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), abstract)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=restore_args, partial_restore=True)))
  finally:
    manager.close()
  return step, restored.state


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state` (arrays or abstract values) carrying `shardings`, the target of a restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def save_run_files(directory: str, config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                   tokenizer: Any) -> None:
  """Writes `directory`/run/: the train config, the model config and the tokenizer (each file atomically)."""
  run = epath.Path(_absolute(directory)) / RUN_DIR
  (run / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(run / TRAIN_CONFIG, (config.to_json(indent=2, sort_keys=True) + "\n").encode())
  atomic_write_bytes(run / MODEL_CONFIG, (json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n").encode())
  # save_pretrained writes only local files; stage them, then copy (gs:// directories included).
  with tempfile.TemporaryDirectory() as staging:
    for file in tokenizer.save_pretrained(staging):
      atomic_write_bytes(run / TOKENIZER_DIR / pathlib.Path(file).name, pathlib.Path(file).read_bytes())


def load_run_files(directory: str) -> tuple[ml_collections.ConfigDict, ModelConfig, Any]:
  """(train config, ModelConfig, tokenizer) saved by `save_run_files` in checkpoint `directory`."""
  run = epath.Path(_absolute(directory)) / RUN_DIR
  if not (run / MODEL_CONFIG).exists():
    raise FileNotFoundError(f"{run / MODEL_CONFIG}: missing; {directory} is not an o1jax checkpoint directory "
                            "(python -m o1jax.train writes run/ when it starts)")
  try:
    config = ml_collections.ConfigDict(json.loads((run / TRAIN_CONFIG).read_text()))
    model_cfg = ModelConfig(**json.loads((run / MODEL_CONFIG).read_text()))
  except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{run}: unreadable run files ({TRAIN_CONFIG}, {MODEL_CONFIG}): {e}") from e
  with tempfile.TemporaryDirectory() as staging:
    for file in (run / TOKENIZER_DIR).iterdir():
      (pathlib.Path(staging) / file.name).write_bytes(file.read_bytes())
    tokenizer = transformers.AutoTokenizer.from_pretrained(staging)
  return config, model_cfg, tokenizer


class StopRequest:
  """Set by SIGTERM/SIGINT while `catch_stop_signals` is active; the loop saves and exits at a step boundary."""

  def __init__(self):
    self._event = threading.Event()
    self.signal_name = ""

  def __bool__(self) -> bool:
    return self._event.is_set()

  def set(self, signum: int) -> None:
    self.signal_name = signal.Signals(signum).name
    self._event.set()


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
  """Within the block, SIGTERM and SIGINT only set the yielded StopRequest; old handlers come back after."""
  request = StopRequest()
  previous = {s: signal.signal(s, lambda signum, frame: request.set(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield request
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
