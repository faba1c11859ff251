"""Scaled dot-product attention over a boolean mask, by one of several implementations chosen in the config.

  einsum  grouped-query einsums with float32 scores [B, kv_heads, groups, T, S]: runs everywhere, the reference
  xla     `jax.nn.dot_product_attention(implementation="xla")`: the same math through XLA's own attention op
  cudnn   cuDNN flash attention (`implementation="cudnn"`): no score tensor in memory, 2-3x faster on NVIDIA
          GPUs; only for bf16/fp16 inputs on a GPU with query and key lengths that are multiples of 64
  auto    cudnn where it can run, else einsum

The mask (causality, sliding window, padding, KV-cache slots; `decoder.attention_mask`) is the same for all, so
left- and right-padded rows, prefill and one-token decoding mean the same thing everywhere. A case an
implementation cannot take falls back to the einsum, said once in the log per reason.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
CUDNN_TILE = 64  # cuDNN refuses sequence lengths that are not a multiple of its tile
_said: set[str] = set()


def _fallback(requested: str, reason: str) -> str:
  if (requested, reason) not in _said:
    _said.add((requested, reason))
    logging.info("attention=%s: %s; using the einsum implementation", requested, reason)
  return "einsum"


def resolve(requested: str, q: jax.Array, k: jax.Array) -> str:
  """The implementation that runs for these (traced) shapes and dtypes on the default backend."""
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"attention={requested!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
  if requested not in ("auto", "cudnn"):
    return requested
  if jax.default_backend() != "gpu":
    return "einsum" if requested == "auto" else _fallback(requested, f"no GPU (backend {jax.default_backend()})")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return _fallback(requested, f"cuDNN attention takes bf16/fp16, not {q.dtype}")
  if q.shape[1] % CUDNN_TILE or k.shape[1] % CUDNN_TILE:
    return _fallback(requested, f"lengths {q.shape[1]} x {k.shape[1]} are not multiples of {CUDNN_TILE}")
  return "cudnn"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str) -> jax.Array:
  """Attention output [B, T, heads * head_dim].

  Args:
    q: [B, T, heads, head_dim]; k, v: [B, S, kv_heads, head_dim] (heads a multiple of kv_heads).
    mask: [B, 1, 1, T, S] bool, True where a query may see a key.
  """
  b, t, heads, hd = q.shape
  kv_heads = k.shape[2]
  chosen = resolve(implementation, q, k)
  if chosen == "einsum":
    groups = heads // kv_heads
    grouped = q.reshape(b, t, kv_heads, groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32) * hd**-0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads * hd)
  out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, :, 0],
                                     scale=hd**-0.5, implementation=chosen)
  return out.reshape(b, t, heads * hd)
