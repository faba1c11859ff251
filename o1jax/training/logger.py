"""Training metrics to the console, a tqdm progress bar with ETA, a JSONL file and TensorBoard event files.

Only process 0 writes. Metrics arrive as device scalars; they are fetched to the host only on logging steps so
the step loop does not wait for the device every step.

A run that resumes at step S logs steps S+1, ... again; the JSONL file and TensorBoard show each step once: lines
of steps after S are dropped from the JSONL file when the logger opens it (an atomic rewrite), and TensorBoard is
told to purge its events from step S+1 on. (A run that starts at step 0 starts both afresh.)

Both may be object-store paths (`gs://...`). Objects cannot be appended to: the JSONL object is rewritten whole
(through `o1jax.storage`) at most every `UPLOAD_EVERY_S` seconds and when the logger closes, so a killed run loses
at most that much of its log, which its resume logs again; tensorboardX writes gs:// event files itself (through
google-cloud-storage, which honours STORAGE_EMULATOR_HOST), re-uploading the run's event file on each flush.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np
import tensorboardX
import tqdm

from o1jax import storage
from o1jax.files import atomic_write_text

UPLOAD_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class LogSettings:
  """`config.log`: print every `every` steps; TensorBoard events and a JSONL file of the logged steps (empty: off)."""
  every: int = 10
  tensorboard_dir: str = ""
  jsonl: str = ""


class TrainLogger:
  """`log(step, metrics)` every step; prints and writes every `every` steps and on `flush`."""

  def __init__(self, total_steps: int, first_step: int, settings: LogSettings, tokens_per_step: int = 0,
               flops_per_step: float = 0.0, peak_flops: float = 0.0, enabled: bool = True):
    every, tensorboard_dir, jsonl = settings.every, settings.tensorboard_dir, settings.jsonl
    self.every, self.enabled = every, enabled
    self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
    self._bar = tqdm.tqdm(total=total_steps, initial=first_step, unit="step", file=sys.stderr, dynamic_ncols=True,
                          disable=not enabled)
    self._writer = None
    if enabled and tensorboard_dir:
      self._writer = tensorboardX.SummaryWriter(tensorboard_dir, purge_step=first_step + 1)
    self._jsonl = None
    if enabled and jsonl:
      kept = _keep_steps_up_to(jsonl, first_step)
      if storage.is_remote(jsonl):
        self._jsonl = _ObjectLines(jsonl, kept)
      else:
        self._jsonl = open(jsonl, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._pending: tuple[int, Mapping[str, Any]] | None = None
    self._last_time, self._last_step = time.perf_counter(), first_step
    self.history: list[dict[str, float]] = []

  def log(self, step: int, metrics: Mapping[str, Any]) -> None:
    """`step` is the number of optimizer steps done; metrics are those of that step."""
    self._bar.update(step - self._bar.n)
    self._pending = (step, metrics)
    if step % self.every == 0:
      self.flush()

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    now = time.perf_counter()
    if step > self._last_step:
      seconds = (now - self._last_time) / (step - self._last_step)
      values["step_time_s"] = seconds
      if self.tokens_per_step:
        values["tokens_per_s"] = self.tokens_per_step / seconds
      if self.flops_per_step and self.peak_flops:
        values["mfu"] = self.flops_per_step / seconds / self.peak_flops
    self._last_time, self._last_step = now, step
    values["step"] = step
    self.history.append(values)
    if not self.enabled:
      return
    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "step")
    self._bar.write(f"step {step}: {shown}")
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(values) + "\n")
      self._jsonl.flush()
    if self._writer is not None:
      for k, v in values.items():
        if k != "step":
          self._writer.add_scalar(f"train/{k}", v, step)
      self._writer.flush()

  def close(self) -> None:
    self.flush()
    self._bar.close()
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()


class _ObjectLines:
  """The text file interface the logger uses, for a JSONL object: `write` collects lines, `flush` uploads the
  whole object when `UPLOAD_EVERY_S` seconds have passed since the last upload, `close` uploads what is left."""

  def __init__(self, path: str, lines: list[str]):
    self._path, self._lines = path, list(lines)
    self._uploaded, self._dirty = time.monotonic(), False

  def write(self, text: str) -> None:
    self._lines.append(text)
    self._dirty = True

  def flush(self, force: bool = False) -> None:
    if self._dirty and (force or time.monotonic() - self._uploaded >= UPLOAD_EVERY_S):
      atomic_write_text(self._path, "".join(self._lines))
      self._uploaded, self._dirty = time.monotonic(), False

  def close(self) -> None:
    self.flush(force=True)


def _keep_steps_up_to(path: str, last_step: int) -> list[str]:
  """Drops the lines of `path` (a metrics JSONL file) after step `last_step`, and a line cut short by a kill;
  returns the lines kept."""
  if not storage.exists(path):
    if not storage.is_remote(path):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return []
  lines = storage.read_text(path).splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass
  if kept != lines:
    atomic_write_text(path, "".join(kept))
  return kept
