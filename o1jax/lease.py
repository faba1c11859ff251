"""An exclusive lease on a Cloud Storage path (`gs://`): the lock of a checkpoint directory where flock cannot work.

The lock is one object, created with the precondition ifGenerationMatch=0 (of two creators, exactly one
succeeds), whose bytes name its owner (host, pid, boot id) as JSON. While it is held, a background thread
refreshes its custom metadata `heartbeat` (the holder's clock, Unix seconds) every `HEARTBEAT_S` seconds, with
ifGenerationMatch=<its generation>, so a holder never touches a lock that has since become someone else's. The
holder deletes the object, again only if it is still its generation, when it is done.

A lock left behind is stale, and taken over, when its heartbeat is older than `STALE_S` seconds (the hosts'
clocks must agree to well within that, as NTP keeps them), or at once when its holder ran on this machine (same
host name and boot) under a pid that no longer exists: the rerun of a killed trainer does not wait. Taking over
deletes the stale lock only if it is still the generation judged stale, then creates a new one with
ifGenerationMatch=0: of two trainers taking over together, one wins and the other sees a fresh lock.

A holder whose heartbeat fails its precondition has lost the lock (deleted by hand, or taken over after this
process stalled for longer than `STALE_S`): it logs an error and stops refreshing; it cannot stop its trainer.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from o1jax import storage

HEARTBEAT_S = 30.0
STALE_S = 120.0


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
      return f.read().strip()
  except OSError:  # not Linux: a lock of this host is then judged by its heartbeat alone
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def describe(owner: dict) -> str:
  return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}"


class Lease:
  """`acquire()` takes the lock object `path` (or says who holds it); `release()` gives it back."""

  def __init__(self, path: str):
    self.path = path
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id()}
    self._generation: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _stale(self, owner: dict, metadata: dict[str, str]) -> bool:
    try:
      heartbeat = float(metadata["heartbeat"])
    except (KeyError, ValueError):
      heartbeat = 0.0  # no readable heartbeat: a lock no o1jax holder keeps alive
    if time.time() - heartbeat > STALE_S:
      return True
    same_machine = (owner.get("host") == self.owner["host"] and self.owner["boot_id"]
                    and owner.get("boot_id") == self.owner["boot_id"])
    return bool(same_machine) and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"])

  def _holder(self) -> tuple[str, dict, dict[str, str]] | None:
    """(generation, owner, metadata) of the lock object, or None when there is none."""
    found = storage.object_generation(self.path)
    if found is None:
      return None
    generation, metadata = found
    try:
      owner = json.loads(storage.read_bytes(self.path))
    except FileNotFoundError:
      return None
    except ValueError:
      owner = {}
    return generation, owner if isinstance(owner, dict) else {}, metadata

  def acquire(self) -> str:
    """Takes the lock: "" on success, else who holds it."""
    for _ in range(3):  # a lock released or taken over between our reads: look again
      held = self._holder()
      if held is not None:
        generation, owner, metadata = held
        if not self._stale(owner, metadata):
          return describe(owner)
        logging.warning("%s: taking over the lock of a trainer that is gone (%s)", self.path, describe(owner))
        if not storage.delete_if_generation(self.path, generation):
          continue
      if storage.create_new(self.path, json.dumps(self.owner).encode(), self._heartbeat()):
        found = storage.object_generation(self.path)
        if found is not None:
          self._generation = found[0]
          self._thread = threading.Thread(target=self._heartbeats, name="o1jax-lease", daemon=True)
          self._thread.start()
          return ""
    held = self._holder()
    return describe(held[1]) if held else "another trainer (it changed while being read)"

  @staticmethod
  def _heartbeat() -> dict[str, str]:
    return {"heartbeat": f"{time.time():.3f}"}

  def _beat(self) -> bool:
    return storage.set_metadata(self.path, self._heartbeat(), self._generation)

  def _heartbeats(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if not self._beat():
          logging.error("%s: this trainer lost its lock (deleted or taken over): another trainer may now write "
                        "the same checkpoint directory", self.path)
          return
      except OSError as e:  # a network error: the next beat may get through before the lock goes stale
        logging.warning("%s: lock heartbeat failed (%s)", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is not None:
      storage.delete_if_generation(self.path, self._generation)
      self._generation = None
