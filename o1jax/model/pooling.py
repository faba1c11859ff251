"""Inputs and outputs of an embedding pass: RoPE positions of padded rows, the vector at each row's last token."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def positions(mask: jnp.ndarray) -> jnp.ndarray:
  """RoPE positions of right- (or left-) padded rows: 0, 1, ... over the real tokens."""
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def pool_last(hidden: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """L2-normalised float32 hidden state at each row's last real token (`<emb>` in right-padded rows)."""
  last = jnp.sum(mask, axis=-1) - 1
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return h * jax.lax.rsqrt(jnp.maximum(jnp.sum(h * h, axis=-1, keepdims=True), 1e-12))
