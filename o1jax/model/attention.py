"""Scaled dot-product attention over a boolean mask, by one of several implementations chosen in the config.

  einsum  grouped-query einsums with float32 scores [B, kv_heads, groups, T, S]: runs everywhere, the reference
  xla     `jax.nn.dot_product_attention(implementation="xla")`: the same math through XLA's own attention op
  cudnn   cuDNN flash attention (`implementation="cudnn"`): no score tensor in memory, 2-3x faster on NVIDIA
          GPUs; only for bf16/fp16 inputs on a GPU with query and key lengths that are multiples of 64
  splash  Pallas splash attention, the TPU flash kernel: causal (or Mistral's local window) block-sparse attention
          with padding as segment ids, no score tensor in memory; for attention without a KV cache (training,
          encoding) over lengths that are multiples of 128. Elsewhere than on a TPU it runs through Pallas'
          interpreter: slow, for checking it against the einsum on a CPU
  auto    cudnn on a GPU, splash on a TPU, where they can run; else einsum

The mask (causality, sliding window, padding, KV-cache slots; `decoder.attention_mask`) is the same for all, so
left- and right-padded rows, prefill and one-token decoding mean the same thing everywhere; splash takes the same
mask in its structured form (causal or local, plus which keys are real). A case an implementation cannot take
falls back to the einsum, said once in the log per reason.
"""
from __future__ import annotations

import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
CUDNN_TILE = 64  # cuDNN refuses sequence lengths that are not a multiple of its tile
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the length; MaxText's 512 suits long sequences
_said: set[tuple[str, str]] = set()


def _fallback(requested: str, reason: str) -> str:
  if (requested, reason) not in _said:
    _said.add((requested, reason))
    logging.info("attention=%s: %s; using the einsum implementation", requested, reason)
  return "einsum"


def resolve(requested: str, q: jax.Array, k: jax.Array, key_valid: jax.Array | None = None) -> str:
  """The implementation that runs for these (traced) shapes and dtypes on the platform traced for. `key_valid` is
  given for attention without a KV cache (the only case splash takes)."""
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"attention={requested!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
  backend = traced_platform()
  chosen = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "einsum") if requested == "auto" else requested
  problem = ""
  if chosen == "cudnn":
    problem = _cudnn_problem(q, k, backend)
  elif chosen == "splash":
    problem = _splash_problem(q, k, key_valid)
  return _fallback(requested, problem) if problem else chosen


def traced_platform() -> str:
  """The platform the traced program is for: the mesh's devices (so a TPU program compiled ahead of time on a CPU
  host gets TPU kernels), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _cudnn_problem(q: jax.Array, k: jax.Array, backend: str) -> str:
  if backend != "gpu":
    return f"no GPU (backend {backend})"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention takes bf16/fp16, not {q.dtype}"
  if q.shape[1] % CUDNN_TILE or k.shape[1] % CUDNN_TILE:
    return f"lengths {q.shape[1]} x {k.shape[1]} are not multiples of {CUDNN_TILE}"
  return ""


def _splash_problem(q: jax.Array, k: jax.Array, key_valid: jax.Array | None) -> str:
  if key_valid is None:
    return "splash takes attention without a KV cache (prefill and decoding use the einsum)"
  if q.shape[1] != k.shape[1] or q.shape[1] % SPLASH_BLOCKS[-1]:
    return f"lengths {q.shape[1]} x {k.shape[1]} are not one multiple of {SPLASH_BLOCKS[-1]}"
  return ""


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str,
           key_valid: jax.Array | None = None, sliding_window: int | None = None) -> jax.Array:
  """Attention output [B, T, heads * head_dim].

  Args:
    q: [B, T, heads, head_dim]; k, v: [B, S, kv_heads, head_dim] (heads a multiple of kv_heads).
    mask: [B, 1, 1, T, S] bool, True where a query may see a key.
    key_valid: [B, S] bool, which keys are real tokens, given (with `sliding_window`) only when `mask` is exactly
      causal (within the window) attention over the same tokens with padding: what splash needs to rebuild it.
  """
  b, t, heads, hd = q.shape
  kv_heads = k.shape[2]
  chosen = resolve(implementation, q, k, key_valid)
  if chosen == "einsum":
    groups = heads // kv_heads
    # Both contractions batch over [B, kv_heads]: with a KV cache the transposes around them cancel against the
    # cache's layouts (decoder.Attention), and XLA reads the cached keys and values in place.
    grouped = q.reshape(b, t, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    scores = jnp.einsum("bkgtd,bksd->bkgts", grouped, k, preferred_element_type=jnp.float32) * hd**-0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads * hd)
  if chosen == "splash":
    return _splash(q, k.astype(q.dtype), v.astype(q.dtype), key_valid, sliding_window).reshape(b, t, heads * hd)
  out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, :, 0],
                                     scale=hd**-0.5, implementation=chosen)
  return out.reshape(b, t, heads * hd)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, sliding_window: int | None) -> jax.Array:
  """Splash attention [B, T, heads, head_dim], on each device's batch rows and kv heads (a Pallas kernel is opaque
  to XLA's partitioner, so it runs inside shard_map over the activation sharding of the logical rules)."""
  # Pallas is imported when splash is traced: the other implementations never load it.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  b, t, heads, hd = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  block = next(size for size in SPLASH_BLOCKS if t % size == 0)
  local = (splash.CausalMask((t, t)) if sliding_window is None or sliding_window >= t else
           splash.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0))
  # One kernel per kv head: its query heads (the group) share one key and value head (MQA form).
  kernel = splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([local] * groups), block_sizes=splash.BlockSizes(
          block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
          block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
      interpret=traced_platform() != "tpu")
  # Padding keys and queries get segment 0, real tokens 1: a real query sees only real keys, as the mask says.
  segments = key_valid.astype(jnp.int32)

  def per_device(q, k, v, segments):
    grouped = q.reshape(q.shape[0], t, k.shape[2], groups, hd).transpose(0, 2, 3, 1, 4) * hd**-0.5
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, T, hd]

    def one_row(q, k, v, segment):
      ids = splash.SegmentIds(q=segment, kv=segment)
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(grouped.astype(k.dtype), k, v, segments)  # [b, kv_heads, groups, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return per_device(q, k, v, segments)
  batch_axes, head_axes = _mesh_axes("activation_batch", b, mesh), _mesh_axes("kv_heads", kv_heads, mesh)
  qkv = PartitionSpec(batch_axes, None, head_axes, None)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(batch_axes, None)),
                       out_specs=qkv, check_vma=False)(q, k, v, segments)


def _mesh_axes(logical: str, size: int, mesh) -> tuple[str, ...] | None:
  """The mesh axes the logical-axis rules map `logical` to, when they divide `size`; else None (replicated)."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if mesh.shape[a] > 1)
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes
