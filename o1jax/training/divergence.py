"""Divergence: a step whose loss or gradient norm is not finite stops the run before anything is saved after it.

The step's metrics stay on the device (fetching them every step would make the loop wait for the device each
step); `check` fetches every step's loss and gradient norm since the last check at once. The loop checks before
every save, log line and evaluation, so no checkpoint is written after a diverged step, and keep-K, which only
removes a step once a newer one is saved, never removes the last finite one. A NaN or infinity anywhere in the
gradients makes their global norm non-finite, so the norm stands for all of them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class Diverged(RuntimeError):
  """A step with a non-finite loss, gradient norm or state; names it."""

  def __init__(self, step: int, problem: str):
    super().__init__(f"step {step}: training diverged ({problem}); nothing after step {step - 1} was saved. Lower "
                     "config.optim.lr or clip gradients (config.optim.clip_norm), then resume from the last "
                     "checkpoint")
    self.step = step


class DivergenceGuard:
  """`observe(step, metrics)` every step (keeps device scalars); `check()` raises Diverged for the first bad one."""

  def __init__(self):
    self._pending: list[tuple[int, Any, Any]] = []

  def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._pending.append((step, metrics["loss"], metrics["grad_norm"]))

  def check(self) -> None:
    pending, self._pending = self._pending, []
    values = jax.device_get([(loss, grad_norm) for _, loss, grad_norm in pending])
    for (step, _, _), (loss, grad_norm) in zip(pending, values):
      if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        raise Diverged(step, f"loss={float(loss)}, grad_norm={float(grad_norm)}")
