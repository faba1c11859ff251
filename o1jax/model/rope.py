"""Rotary position embeddings in Hugging Face's layout (rotate-half, not interleaved), with its scaling variants."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from o1jax.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies [head_dim // 2], float32, as transformers computes them."""
  exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** exponents)
  scaling = cfg.rope_scaling or {}
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif rope_type == "llama3":
    inv_freq = _llama3_inverse_frequencies(inv_freq, scaling)
  return inv_freq.astype(np.float32)


def _llama3_inverse_frequencies(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
  # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(is_medium, smoothed, scaled)


def rotary_tables(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos and sin tables [B, T, head_dim] in float32 for integer positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(cfg))
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, heads, head_dim] by the tables [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
