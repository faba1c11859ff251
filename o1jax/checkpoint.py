"""Orbax checkpoints of the train state and the data position, their integrity, and the directory lock.

One checkpoint per saved step holds two items: `state` (the sharded pytree: params, LoRA, optimizer state, step,
PRNG key data; every process writes its shards) and `data` (JSON: the next batch index and what gives it its
meaning, so resume continues at the exact same example, and one checksum per state leaf). Saves are asynchronous:
the step loop goes on while orbax writes, and each step directory appears under its final name only when complete.
Paths may be local or `gs://...`: orbax writes through etils.epath (on fsspec/gcsfs, see `o1jax.storage`) and
tensorstore; o1jax's own files go through `o1jax.storage`. On an object store a step appears when orbax writes its
`commit_success.txt` last (there is no directory rename), and a step without it is not listed.

Integrity. A state with a NaN or an infinity is never saved (`NonFiniteState`), so keep-K only ever replaces a
finite step with a newer finite one. Each leaf's checksum is the wrapping uint32 sum of its bit patterns weighted by
position: integer arithmetic, exact in any reduction order, so it is the same whatever mesh saved or restores it.
A restore compares the saved shapes with the state the run builds (`StateMismatch`, before orbax reads anything),
then the checksums and finiteness of what it read (`CorruptStep`, also for a step orbax cannot read at all).
`restore_latest(fallback=True)` sets a corrupt step aside (moved to `unrestorable/`, never deleted) and restores
the one before it.

Beside the step directories, `run/` holds what rebuilds the model without the training command line: the train
config (`train_config.json`), the model architecture (`model_config.json`) and the tokenizer with the special
tokens (`tokenizer/`), written by process 0 once a run has restored or initialised its state (`save_run_files`,
read by `load_run_files`), so they always describe the steps beside them. `.lock` is held by the one trainer
writing the directory (`exclusive`): an flock on a local disk, a lease object on Cloud Storage (`o1jax.lease`).

Stopping on SIGTERM (preemption) or SIGINT at the same step in every process is `o1jax.training.preemption`'s.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import socket
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import transformers

from o1jax import lease, storage
from o1jax.files import atomic_write_bytes
from o1jax.model import ModelConfig

RUN_DIR = "run"
TRAIN_CONFIG, MODEL_CONFIG, TOKENIZER_DIR = "train_config.json", "model_config.json", "tokenizer"
SET_ASIDE_DIR, LOCK_FILE = "unrestorable", ".lock"
CHECKSUMS = "state_checksums"  # the key of the data item holding one checksum per state leaf


class CheckpointError(Exception):
  """A checkpoint directory or step that cannot be used as asked; the message names it and what to do."""


class NonFiniteState(CheckpointError):
  """A save refused: the state holds a NaN or an infinity."""

  def __init__(self, directory: str, step: int, leaves: list[str]):
    self.problem = (f"NaN or infinite values in {len(leaves)} state array(s): {', '.join(leaves[:2])}"
                    f"{', ...' if len(leaves) > 2 else ''}")
    super().__init__(f"{directory}: refusing to save step {step}: {self.problem}")
    self.step = step


class StateMismatch(CheckpointError):
  """A saved step whose leaves or shapes differ from the state this run builds (the config changed)."""

  def __init__(self, directory: str, step: int, problems: list[str]):
    # A parameter names the change more plainly than the optimizer moments that follow it.
    shown = sorted(problems, key=lambda p: not p.startswith(("params.", "lora.")))[:2]
    super().__init__(f"{directory}/{step}: saved with another state than this config builds ({len(problems)} "
                     f"array(s) differ, e.g. {'; '.join(shown)})")
    self.directory, self.step, self.problems = directory, step, problems


class CorruptStep(CheckpointError):
  """A saved step that cannot be read, or whose values changed since the save, or are not finite."""

  def __init__(self, directory: str, step: int, problem: str):
    super().__init__(f"{directory}/{step}: checkpoint step {step} is corrupt or partial: {problem}")
    self.directory, self.step, self.problem = directory, step, problem


class DirectoryLocked(CheckpointError):
  """Another trainer holds the checkpoint directory."""


def _absolute(directory: str) -> str:
  return directory if "://" in directory else os.path.abspath(directory)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """`config.checkpoint`: where (empty: no checkpoints), how often, how many to keep, saved in the background,
  and whether a corrupt latest step is set aside to resume from the one before (`fallback`)."""
  dir: str = ""
  every: int = 100
  keep: int = 3
  async_save: bool = True
  fallback: bool = False


def _leaf_name(path) -> str:
  """`opt_state.inner_states.train.0.mu.params.x`: the same for a live tree and orbax's metadata of it (which
  stores named tuples as dicts)."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _words(x: jax.Array) -> jax.Array:
  """x's bit patterns as uint32 (64-bit values as two words on a last axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  words = _words(x)
  # Weights 2i+1 (odd, so invertible mod 2^32): a changed or moved word always changes the sum. Per-axis iotas
  # shard like the leaf, where one flat arange would sit whole on every device.
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis in range(words.ndim):
    index = index * jnp.uint32(words.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _fingerprint(state: Any) -> tuple[list[jax.Array], list[jax.Array]]:
  leaves = jax.tree.leaves(state)
  finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True) for x in leaves]
  return [_leaf_checksum(x) for x in leaves], finite


def fingerprint(state: Any) -> tuple[dict[str, int], list[str]]:
  """({leaf name: checksum}, names of leaves holding a NaN or an infinity) of a (sharded) state; every process
  gets the same answer."""
  names = [_leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  checksums, finite = jax.device_get(_fingerprint(state))
  return ({n: int(c) for n, c in zip(names, checksums)}, [n for n, ok in zip(names, finite) if not ok])


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  # Registered up front (not inferred from the first save's args) so a fresh manager can read a step's metadata.
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, handler, save, restore in (("state", ocp.StandardCheckpointHandler, ocp.args.StandardSave,
                                        ocp.args.StandardRestore),
                                       ("data", ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore)):
    registry.add(item, save, handler)
    registry.add(item, restore, handler)
  return registry


def _first_line(error: BaseException) -> str:
  text = (str(error).strip() or type(error).__name__).splitlines()[0]
  return text.split(" See full TensorStore details")[0][:300]  # the rest is a repr of the whole TensorStore spec


class Checkpointer:
  """`CheckpointManager` keeping the last `keep` checkpoints, saving every `every` steps (or when forced)."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    self.directory, self.every = _absolute(directory), every
    # The schedule is ours (multiples of `every`); orbax's own would also save the first step it sees.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handlers())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, ..., force)` writes a checkpoint."""
    return force or step % self.every == 0

  def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = False) -> bool:
    """Starts saving (in the background when async) if `step` is a multiple of `every` or `force`.

    Raises NonFiniteState, saving nothing, if any leaf of `state` holds a NaN or an infinity."""
    if not self.due(step, force):
      return False
    checksums, non_finite = fingerprint(state)
    if non_finite:
      raise NonFiniteState(self.directory, step, non_finite)
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({**data_state, CHECKSUMS: checksums})),
                              force=force)

  def _saved_dtypes(self, step: int, abstract_state: Any) -> dict[str, Any]:
    """{leaf: saved dtype}; raises StateMismatch if the saved leaves or shapes are not those of `abstract_state`."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      if saved is None:
        raise ValueError("no metadata for the item 'state'")
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files; all mean the same here
      raise CorruptStep(self.directory, step, f"its metadata cannot be read ({_first_line(e)})") from e
    have = {_leaf_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = [f"{n}: saved, not in this run's state" for n in sorted(have.keys() - want.keys())]
    problems += [f"{n}: in this run's state, not saved" for n in sorted(want.keys() - have.keys())]
    problems += [f"{n}: saved shape {tuple(have[n].shape)}, this run's {tuple(want[n].shape)}"
                 for n in sorted(have.keys() & want.keys()) if tuple(have[n].shape) != tuple(want[n].shape)]
    if problems:
      raise StateMismatch(self.directory, step, problems)
    return {n: jnp.dtype(m.dtype) for n, m in have.items()}

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, placed as `abstract_state` says (ShapeDtypeStructs with shardings), and its data.

    Raises StateMismatch (another state shape) or CorruptStep (unreadable, changed since the save, non-finite)."""
    saved_dtypes = self._saved_dtypes(step, abstract_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # see _saved_dtypes
      raise CorruptStep(self.directory, step, f"orbax cannot restore it ({_first_line(e)})") from e
    data = dict(restored.data)
    expected = data.pop(CHECKSUMS, {})  # absent from checkpoints written before checksums existed
    checksums, non_finite = fingerprint(restored.state)
    # A leaf restored into another dtype (a changed param_dtype) was cast: its bits are not the saved ones.
    same_dtype = {n for n, x in zip(checksums, jax.tree.leaves(abstract_state)) if saved_dtypes[n] == x.dtype}
    changed = [n for n in checksums if n in expected and n in same_dtype and expected[n] != checksums[n]]
    if changed:
      raise CorruptStep(self.directory, step, f"{len(changed)} array(s) differ from what was saved (checksum "
                                              f"mismatch in {', '.join(changed[:3])})")
    if non_finite:
      raise CorruptStep(self.directory, step, f"non-finite values in {', '.join(non_finite[:3])}")
    return restored.state, data

  def restore_latest(self, abstract_state: Any, fallback: bool = False
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data) of the newest step, or None when there is none.

    A corrupt step raises CorruptStep naming the step before it; with `fallback`, it is moved to
    `unrestorable/` instead (nothing is deleted) and the step before it is restored."""
    for step in reversed(self.all_steps()):
      try:
        return (step, *self.restore(step, abstract_state))
      except CorruptStep as e:
        older = [s for s in self.all_steps() if s < step]
        if not older:
          raise CorruptStep(self.directory, step, f"{e.problem}; no earlier step to fall back to") from e
        if not fallback:
          raise CorruptStep(self.directory, step, f"{e.problem}; to resume from step {older[-1]}, rerun with "
                            f"--config.checkpoint.fallback=True (moves step {step} to "
                            f"{self.directory}/{SET_ASIDE_DIR}/)") from e
        logging.warning("%s; setting it aside and falling back to step %d", e, older[-1])
        self._set_aside(step)
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      aside = storage.join(self.directory, SET_ASIDE_DIR)
      storage.makedirs(aside)
      target, n = storage.join(aside, str(step)), 1
      while storage.exists(target):
        target, n = storage.join(aside, f"{step}.{n}"), n + 1
      storage.rename(storage.join(self.directory, str(step)), target)
    multihost_utils.sync_global_devices(f"o1jax checkpoint: step {step} set aside")
    self._manager.reload()

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
  run = storage.join(_absolute(directory), RUN_DIR)
  storage.makedirs(storage.join(run, TOKENIZER_DIR))
  atomic_write_bytes(storage.join(run, TRAIN_CONFIG), (config.to_json(indent=2, sort_keys=True) + "\n").encode())
  atomic_write_bytes(storage.join(run, MODEL_CONFIG),
                     (json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n").encode())
  # save_pretrained writes only local files; stage them, then copy (gs:// directories included).
  with tempfile.TemporaryDirectory() as staging:
    for file in tokenizer.save_pretrained(staging):
      atomic_write_bytes(storage.join(run, TOKENIZER_DIR, pathlib.Path(file).name), pathlib.Path(file).read_bytes())


def load_run_files(directory: str) -> tuple[ml_collections.ConfigDict, ModelConfig, Any]:
  """(train config, ModelConfig, tokenizer) saved by `save_run_files` in checkpoint `directory`."""
  run = storage.join(_absolute(directory), RUN_DIR)
  if not storage.exists(storage.join(run, MODEL_CONFIG)):
    raise FileNotFoundError(f"{storage.join(run, MODEL_CONFIG)}: missing; {directory} is not an o1jax checkpoint "
                            "directory (python -m o1jax.train writes run/ when it starts)")
  try:
    config = ml_collections.ConfigDict(json.loads(storage.read_text(storage.join(run, TRAIN_CONFIG))))
    model_cfg = ModelConfig(**json.loads(storage.read_text(storage.join(run, MODEL_CONFIG))))
  except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{run}: unreadable run files ({TRAIN_CONFIG}, {MODEL_CONFIG}): {e}") from e
  with tempfile.TemporaryDirectory() as staging:
    tokenizer_dir = storage.join(run, TOKENIZER_DIR)
    for name in storage.listdir(tokenizer_dir):
      (pathlib.Path(staging) / name).write_bytes(storage.read_bytes(storage.join(tokenizer_dir, name)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(staging)
  return config, model_cfg, tokenizer


def load_run_config(directory: str) -> dict[str, Any] | None:
  """The train config JSON of `directory`/run/ (that of the run whose steps are there), or None before one."""
  path = storage.join(_absolute(directory), RUN_DIR, TRAIN_CONFIG)
  if not storage.exists(path):
    return None
  try:
    return json.loads(storage.read_text(path))
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable ({e})") from e


def _holder(path: str) -> str:
  try:
    text = storage.read_text(path).strip()
  except OSError:
    return "unknown"
  if not storage.is_remote(path):
    return text or "unknown"
  try:
    return lease.describe(json.loads(text))
  except (ValueError, AttributeError):
    return "unknown"


def _take_lock(path: str) -> tuple[Callable[[], None] | None, str]:
  """(release, "") once this process holds the lock `path`, or (None, who holds it)."""
  if storage.is_remote(path):
    held = lease.Lease(path)
    holder = held.acquire()
    return (None, holder) if holder else (held.release, "")
  local = pathlib.Path(path)
  local.parent.mkdir(parents=True, exist_ok=True)
  fd, holder = _lock(local)
  if fd is None:
    return None, holder

  def release() -> None:
    # Unlinked before the lock goes: unlinked after, it could be the file a new holder has just locked.
    local.unlink(missing_ok=True)
    os.close(fd)
  return release, ""


@contextlib.contextmanager
def exclusive(directory: str) -> Iterator[None]:
  """Within the block, this job is the only trainer writing checkpoint `directory`.

  Process 0 holds the lock `directory`/.lock, which records its host and pid. On a local disk it is an exclusive
  flock, which the kernel releases when the process ends however it ends, so the lock of a killed trainer is
  simply taken over. On Cloud Storage (`gs://`) it is a lease object (`o1jax.lease`): created only if absent,
  kept alive by a heartbeat, taken over once stale (at once when its holder ran on this machine and is gone).
  Every process of the job raises DirectoryLocked together when it is held elsewhere. Other object stores have
  no such lock: a warning says so.
  """
  directory = _absolute(directory)
  if storage.is_remote(directory) and not directory.startswith("gs://"):
    logging.warning("%s: no lock on this object store: make sure no other trainer writes this directory", directory)
    yield
    return
  path = storage.join(directory, LOCK_FILE)
  release, held_by = None, ""
  if jax.process_index() == 0:
    release, held_by = _take_lock(path)
  if jax.process_count() > 1:
    if not multihost_utils.broadcast_one_to_all(np.int32(not held_by)):
      held_by = held_by or _holder(path)
  if held_by:
    raise DirectoryLocked(f"{directory}: another trainer is writing this checkpoint directory ({path} is held by "
                          f"{held_by}); two would overwrite each other's steps: stop it, or set another "
                          "config.checkpoint.dir")
  try:
    yield
  finally:
    if release is not None:
      release()


def _lock(path: pathlib.Path) -> tuple[int | None, str]:
  """(descriptor holding the lock, "") or (None, who holds it)."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return None, _holder(str(path))
    try:
      same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:  # its holder released it (unlinking it) between our open and our lock
      same_file = False
    if same_file:
      os.ftruncate(fd, 0)
      os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())
      return fd, ""
    os.close(fd)
