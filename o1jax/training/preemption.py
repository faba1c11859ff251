"""Stopping a run at the same step in every process: SIGTERM (preemption) or SIGINT, received by any one process.

`stop_signals()` turns SIGTERM and SIGINT into a local flag; the loop asks `StopAgreement.reached(step)` after each
step, and every process gets the same answer at the same step, so all of them save that step and exit.

  * One process: the flag itself, at the step boundary after the signal (what the trainer always did).
  * Several processes: after each step, every process contributes its flag (the signal's number, 0 for none) to
    a max over the devices and reads the result, so all of them stop after the same step: the one during which
    the first signal arrived (or the next, when the signal lands while the vote runs). The vote takes an output of
    the step, so it runs after the step, and is read before the next step is dispatched, so every process runs
    the step's collectives and the vote's in the same order (XLA:CPU may run programs that do not depend on each
    other concurrently, and collectives issued in different orders by two processes deadlock). The price: the
    host no longer queues step N+1 while step N runs, one host round trip per step.

Why not jax's own preemption sync (`jax.distributed.initialize` puts a C handler on SIGTERM that tells the
coordination service; `multihost_utils.reached_preemption_sync_point(step)` then answers True at max(step) + 1):
it works on CPU processes here, but a notice that arrives before the first call (during start-up, restore or the
first compile) sets the sync point to step 1 and is lost: the run trains on and ignores the signal. It also never
sees SIGINT. So the jax preemption service is turned off before `jax.distributed.initialize` (orbax treats it as
no preemption) and the Python handlers here are installed right after it, for the whole run: a signal during
start-up stops the run at its first step. A second signal ends the process at once (the default action).
"""
from __future__ import annotations

from collections.abc import Iterator
import contextlib
import logging
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from o1jax import sharding

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopAgreement:
  """`reached(step, output)` after every step: True after the same step in every process once any of them got a
  signal."""

  def __init__(self):
    self._signal = 0
    self._lock = threading.Lock()
    self._vote = None  # the jitted max over the devices, built at the first use (several processes only)
    self.reason = ""  # why the run stops, for the log line (set when `reached` says True)

  def receive(self, signum: int) -> bool:
    """Records a signal; False when one was already recorded (the caller then ends the process)."""
    with self._lock:
      first, self._signal = not self._signal, signum
    return first

  def reached(self, step: int, output: jax.Array) -> bool:
    """Whether every process stops after `step`. Called once per step by every process, with an output of the
    step (an array on every device of the step's mesh): the vote runs after it."""
    local = self._signal
    agreed = local if jax.process_count() == 1 else self._agree(local, output)
    if agreed:
      name = signal.Signals(agreed).name
      self.reason = name if local == agreed else f"{name} received by another process"
      logging.info("stop agreed after step %d: %s", step, self.reason)
    return bool(agreed)

  def _agree(self, local: int, output: jax.Array) -> int:
    """max(every process's signal number), once `output` is computed."""
    devices = sorted(output.sharding.device_set, key=lambda d: d.id)
    votes = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))
    if self._vote is None:
      # keep_unused: `output` stays an argument, so the vote waits for it.
      self._vote = jax.jit(lambda flags, after: jnp.max(flags), keep_unused=True,
                           out_shardings=NamedSharding(votes.mesh, PartitionSpec()))
    mine = sum(d.process_index == jax.process_index() for d in devices)
    flags = jax.make_array_from_process_local_data(votes, np.full((mine,), local, np.int32), (len(devices),))
    # Replicated over every device: this process's first shard holds the whole value.
    return int(self._vote(flags, output).addressable_data(0))


@contextlib.contextmanager
def stop_signals() -> Iterator[StopAgreement]:
  """Joins the processes (`sharding.initialize_distributed`) with jax's SIGTERM handler off, then, within the
  block, the first SIGTERM/SIGINT only sets the yielded StopAgreement's flag; the old handlers come back after."""
  jax.config.update("jax_enable_preemption_service", False)
  sharding.initialize_distributed()
  agreement = StopAgreement()

  def handler(signum, frame):
    del frame
    if not agreement.receive(signum):  # the second signal: no more waiting for a step boundary
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)

  previous = {s: signal.signal(s, handler) for s in SIGNALS}
  try:
    yield agreement
  finally:
    for s, old in previous.items():
      signal.signal(s, old)
