"""Orbax checkpoints of the train state and the data position, and preemption signals.

One checkpoint per saved step holds two items: `state` (the sharded pytree: params, LoRA, optimizer state, step,
PRNG key data; every process writes its shards) and `data` (JSON: the next batch index, so resume continues at
the exact same example). Saves are asynchronous: the step loop goes on while orbax writes, and each step
directory appears under its final name only when complete. Paths may be local or `gs://...` (orbax writes
through etils.epath).

SIGTERM (preemption) and SIGINT are turned into a flag the loop polls after each step, so it can save a final
checkpoint at a step boundary and exit cleanly.
"""
from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


def _absolute(directory: str) -> str:
  return directory if "://" in directory else os.path.abspath(directory)


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


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state` (arrays or abstract values) carrying `shardings`, the target of a restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


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
