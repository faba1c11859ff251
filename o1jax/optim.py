"""Learning-rate schedule and the optax optimizer: AdamW on trainable leaves only, clipping, decay mask.

Schedule (`config.optim`, steps = `config.train.steps`, W = round(warmup_frac * steps)):
  warmup 'linear':  lr * s / W                                  for s < W
  warmup 'log':     lr * log(s + 1) / log(W)                     for s < W  (DeepSpeed's WarmupLR 'log' type,
                                                                             which the reference uses)
  decay 'linear':   lr * (steps - s) / (steps - W)               for s >= W, reaching 0 at the last step
  decay 'cosine':   lr * (1 + cos(pi * (s - W) / (steps - W))) / 2
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

TRAIN, FROZEN = "train", "frozen"
# Leaves that never get weight decay: norm scales, biases and (input or output) embeddings.
NO_DECAY_NAMES = ("bias", "embed_tokens", "lm_head")


WARMUPS, DECAYS = ("linear", "log"), ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`config.optim`: AdamW with global-norm clipping and the schedule of the module docstring."""
  lr: float = 1e-4
  warmup_frac: float = 0.1
  warmup: str = "log"
  decay: str = "linear"
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 = no clipping (clipping to norm 0 would zero every update)

  def __post_init__(self):
    if self.warmup not in WARMUPS:
      raise ValueError(f"config.optim.warmup={self.warmup!r}; expected 'linear' or 'log'")
    if self.decay not in DECAYS:
      raise ValueError(f"config.optim.decay={self.decay!r}; expected 'linear' or 'cosine'")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> OptimConfig:
    text = ("warmup", "decay")
    return cls(**{f.name: str(values[f.name]) if f.name in text else float(values[f.name])
                  for f in dataclasses.fields(cls)})

  def warmup_steps(self, steps: int) -> int:
    return int(round(self.warmup_frac * steps))


def schedule(optim_cfg: OptimConfig, steps: int) -> optax.Schedule:
  """The learning rate at (0-based) step s; see the module docstring."""
  peak = optim_cfg.lr
  warm = optim_cfg.warmup_steps(steps)
  warmup, decay = optim_cfg.warmup, optim_cfg.decay

  def lr(step):
    s = jnp.asarray(step, jnp.float32)
    if warmup == "linear":
      up = s / max(warm, 1)
    else:  # log(W) is 0 for W = 1: that single warmup step then runs at lr 0, as in DeepSpeed.
      up = jnp.log(s + 1.0) / jnp.log(float(max(warm, 2)))
    frac = jnp.clip((s - warm) / max(steps - warm, 1), 0.0, 1.0)
    down = 1.0 - frac if decay == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return peak * jnp.where(s < warm, up, down)

  return lr


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(trainable: Any) -> Any:
  """True where AdamW applies weight decay: matrices that are not embeddings (so not norms, biases)."""
  def decays(path, x):
    names = _path_names(path)
    return x.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names) and "norm" not in names[-2]
  return jax.tree_util.tree_map_with_path(decays, trainable)


def make_optimizer(optim_cfg: OptimConfig, steps: int, labels: Any) -> optax.GradientTransformation:
  """AdamW with global-norm clipping on leaves labelled TRAIN; FROZEN leaves get no update and no state."""
  # identity keeps the optimizer state's structure, so a run may resume with clipping switched on or off.
  clip = optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity()
  adamw = optax.chain(
      clip,
      optax.adamw(schedule(optim_cfg, steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.multi_transform({TRAIN: adamw, FROZEN: optax.set_to_zero()}, labels)
