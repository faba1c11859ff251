"""The decoder: one Flax module for the Llama, Mistral and Qwen2 families.

Parameter names and shapes follow Hugging Face's (`kernel` is the transposed `weight`; the layers are stacked on a
leading axis and scanned, so compile time does not grow with depth). Every parameter and the main activations carry
logical axis names only; `o1jax.sharding` maps them to a mesh.

Attention masks are built from cache *slots* (causality, sliding window, padding), RoPE from explicit *positions*,
exactly as transformers does; so left- and right-padded batches, prefill and KV-cache decoding share one code path.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from o1jax.model.attention import attend
from o1jax.model.config import ModelConfig
from o1jax.model.projection import Projection
from o1jax.model.rope import apply_rotary, rotary_tables

# Names of the activations a remat policy can keep (`checkpoint_name` tags in the layer code, MaxText's names).
QUERY, KEY, VALUE, CONTEXT, OUT = "query_proj", "key_proj", "value_proj", "context", "out_proj"
MLP_IN, MLP_OUT = "mlpwi", "mlpwo"  # gate and up projections; down projection
_save = jax.checkpoint_policies.save_only_these_names

# Remat policies by name: what each layer keeps for the backward pass instead of recomputing it. From most memory
# to least: none > dots > minimal > save_dot_except_mlpwi > save_dot_except_mlp > save_qkv_proj > full.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output, attention scores included
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections, not attention
    "minimal": _save(QUERY, KEY, VALUE, CONTEXT, OUT, MLP_IN, MLP_OUT),  # every projection and the attention output
    "save_dot_except_mlpwi": _save(QUERY, KEY, VALUE, CONTEXT, OUT, MLP_OUT),
    "save_dot_except_mlp": _save(QUERY, KEY, VALUE, CONTEXT, OUT),
    "save_qkv_proj": _save(QUERY, KEY, VALUE),
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only layer inputs
}

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"


class KVCache(NamedTuple):
  """Keys and values of every layer at fixed slots, and which slots hold a real token. Stacked over layers, or with
  `scan_layers` off a tuple of one buffer per layer (each updated in place)."""
  k: jnp.ndarray | tuple[jnp.ndarray, ...]  # [layers, B, kv_heads, head_dim, S], or layers x [B, kv_heads, ...]
  v: jnp.ndarray | tuple[jnp.ndarray, ...]  # [layers, B, kv_heads, S, head_dim], or layers x [B, kv_heads, ...]
  valid: jnp.ndarray  # [B, S] bool
  index: jnp.ndarray  # int32 scalar: the first free slot

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
    k_shape = (batch, cfg.num_key_value_heads, cfg.head_dim, slots)
    v_shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    if cfg.scan_layers:
      k, v = (jnp.zeros((cfg.num_hidden_layers, *shape), dtype) for shape in (k_shape, v_shape))
    else:
      k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)) for shape in (k_shape, v_shape))
    return cls(k, v, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))

  def grown(self, slots: int) -> KVCache:
    """The same cache with `slots` slots, the new ones empty (a copy: done between decoding loops, not per step)."""
    extra = slots - self.valid.shape[1]
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == x.ndim + axis else 0) for a in range(x.ndim)])
    k, v = (jax.tree.map(lambda x, axis=axis: pad(x, axis), buffers) for buffers, axis in ((self.k, -1), (self.v, -2)))
    return KVCache(k, v, pad(self.valid, -1), self.index)


def _dense(features: int, axes: tuple[str, str], cfg: ModelConfig, name: str, bias: bool = False):
  """A projection of [..., in] activations to [..., features], computed on rows [tokens, in]."""
  dense = Projection(
      features, use_bias=bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
  # Contracting over one token axis instead of (batch, length) lets XLA:CPU compute the kernel's gradient without
  # first transposing the activations' gradient: 1.35x faster MLP backward at SmolLM2's shapes, same math.
  return lambda x: dense(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                        jnp.dtype(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    dtype = jnp.dtype(self.cfg.dtype)
    return weight.astype(dtype) * normed.astype(dtype)


class Attention(nn.Module):
  """Grouped-query attention with RoPE, reading and writing the layer's slice of the KV cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, key_valid=None, k_cache=None, v_cache=None, index=None):
    """`key_valid` [B, T]: which tokens are real, given when `mask` is plain causal attention over them (no cache)."""
    cfg = self.cfg
    b, t, _ = x.shape
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = _dense(heads * hd, ("embed", "heads"), cfg, "q_proj", cfg.attention_bias)(x).reshape(b, t, heads, hd)
    k = _dense(kv_heads * hd, ("embed", "kv_heads"), cfg, "k_proj", cfg.attention_bias)(x).reshape(b, t, kv_heads, hd)
    v = _dense(kv_heads * hd, ("embed", "kv_heads"), cfg, "v_proj", cfg.attention_bias)(x).reshape(b, t, kv_heads, hd)
    q, k, v = checkpoint_name(q, QUERY), checkpoint_name(k, KEY), checkpoint_name(v, VALUE)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if k_cache is not None:
      # The cache holds keys as [B, kv_heads, head_dim, S] and values as [B, kv_heads, S, head_dim]: the layouts
      # the score and output contractions read as plain matmuls, so decoding transposes no cached key or value.
      # (Keys as [.., S, head_dim] make XLA:CPU's one-token score matmul 3x slower: SmolLM2 44.6 -> 42.5 ms a step.)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), (0, 0, 0, index))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.swapaxes(1, 2).astype(v_cache.dtype), (0, 0, index, 0))
      k, v = k_cache.transpose(0, 3, 1, 2), v_cache.swapaxes(1, 2)
    out = checkpoint_name(attend(q, k, v, mask, cfg.attention, key_valid, cfg.sliding_window), CONTEXT)
    # Llama's optional attention bias covers o_proj too; Qwen2's does not.
    o_bias = cfg.attention_bias and cfg.family == "llama"
    out = _dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj", o_bias)(out)
    return checkpoint_name(out, OUT), k_cache, v_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = checkpoint_name(_dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "gate_proj")(x), MLP_IN)
    up = checkpoint_name(_dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "up_proj")(x), MLP_IN)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, (BATCH, LENGTH, "activation_mlp"))
    return checkpoint_name(_dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(hidden), MLP_OUT)


class DecoderLayer(nn.Module):
  """One pre-norm block. `__call__` is the scan body over stacked layers ((x, k_cache, v_cache, layer) is the carry;
  layer i reads and writes slice i of the stacked cache); `block` runs the layer on its own cache buffers."""
  cfg: ModelConfig

  def setup(self):
    self.input_layernorm = RMSNorm(self.cfg)
    self.self_attn = Attention(self.cfg)
    self.post_attention_layernorm = RMSNorm(self.cfg)
    self.mlp = MLP(self.cfg)

  def block(self, x, cos, sin, mask, key_valid, k_cache, v_cache, index):
    h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, key_valid, k_cache, v_cache, index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED)), k_cache, v_cache

  def __call__(self, carry, cos, sin, mask, key_valid, index):
    x, k_all, v_all, layer = carry
    k_cache = v_cache = None
    if k_all is not None:
      k_cache, v_cache = k_all[layer], v_all[layer]
    x, k_cache, v_cache = self.block(x, cos, sin, mask, key_valid, k_cache, v_cache, index)
    if k_all is not None:
      k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_cache, layer, 0)
      v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_cache, layer, 0)
    return (x, k_all, v_all, layer + 1), None


def attention_mask(q_slots, k_slots, k_valid, sliding_window):
  """Which keys each query sees: [B, 1, 1, T, S] bool (broadcast over kv heads and groups)."""
  seen = (k_slots[None, :] <= q_slots[:, None])[None] & k_valid[:, None, :]
  if sliding_window is not None:
    seen &= (q_slots[:, None] - k_slots[None, :] < sliding_window)[None]
  return seen[:, None, None]


class Decoder(nn.Module):
  """`__call__` gives final-norm hidden states (what `<emb>` pooling reads); `logits` applies the LM head."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    layer = DecoderLayer
    if cfg.remat_policy != "none":
      if cfg.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {cfg.remat_policy!r}; choose from {', '.join(REMAT_POLICIES)}")
      layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False,
                       methods=None if cfg.scan_layers else ["block"])
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 5,
          length=cfg.num_hidden_layers, unroll=cfg.num_hidden_layers if cfg.unroll_layers else 1,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]  # parameters layers_0, layers_1, ...
    self.norm = RMSNorm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg)

  def __call__(self, input_ids, positions, attention_mask_, cache: KVCache | None = None):
    """input_ids, positions, attention_mask_: [B, T]. With a cache, the tokens fill slots [index, index + T)
    and the updated cache is returned as well."""
    t = input_ids.shape[1]
    x = nn.with_logical_constraint(self._embed(input_ids), (BATCH, LENGTH, EMBED))
    cos, sin = rotary_tables(self.cfg, positions)
    valid = attention_mask_.astype(bool)
    if cache is None:
      slots = jnp.arange(t)
      mask = attention_mask(slots, slots, valid, self.cfg.sliding_window)
      return self.norm(self._layers(x, cos, sin, mask, valid, None, None, None)[0])
    valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
    q_slots = cache.index + jnp.arange(t)
    mask = attention_mask(q_slots, jnp.arange(valid.shape[1]), valid, self.cfg.sliding_window)
    x, k, v = self._layers(x, cos, sin, mask, None, cache.k, cache.v, cache.index)
    return self.norm(x), KVCache(k, v, valid, cache.index + t)

  def _layers(self, x, cos, sin, mask, key_valid, k, v, index):
    if self.cfg.scan_layers:
      (x, k, v, _), _ = self.layers((x, k, v, jnp.int32(0)), cos, sin, mask, key_valid, index)
      return x, k, v
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      x, k_i, v_i = layer.block(x, cos, sin, mask, key_valid, None if k is None else k[i], None if v is None else v[i],
                                index)
      new_k.append(k_i)
      new_v.append(v_i)
    return x, (None if k is None else tuple(new_k)), (None if v is None else tuple(new_v))

  def _embed(self, input_ids):
    # Gather the table's embed dimension (FSDP-style, like any weight) before the lookup: a lookup into a table
    # sharded on both axes makes XLA re-split the result onto the batch axis by a full rematerialisation.
    table = nn.with_logical_constraint(self.embed_tokens.embedding, ("vocab", None))
    return jnp.take(table, input_ids, axis=0).astype(jnp.dtype(self.cfg.dtype))

  def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
    """LM head, float32 logits [..., vocab]."""
    if self.cfg.tie_word_embeddings:
      return _project(hidden, self.embed_tokens.embedding.T, self.cfg)
    return self.lm_head(hidden)

  def forward_logits(self, input_ids, positions, attention_mask_):
    """Hidden states and logits of one pass (also what creates every parameter at init)."""
    hidden = self(input_ids, positions, attention_mask_)
    return hidden, self.logits(hidden)


def _project(hidden, kernel, cfg: ModelConfig):
  # Compute dtype in, float32 accumulation and output: the loss and sampling need full-precision logits.
  dtype = jnp.dtype(cfg.dtype)
  return jnp.einsum("...d,dv->...v", hidden.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


class LMHead(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                        (self.cfg.hidden_size, self.cfg.vocab_size), jnp.dtype(self.cfg.param_dtype))
    return _project(hidden, kernel, self.cfg)


def _init(cfg: ModelConfig, rng: jax.Array):
  ids = jnp.zeros((1, 1), jnp.int32)
  return Decoder(cfg).init(rng, ids, ids, jnp.ones_like(ids), method=Decoder.forward_logits)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Random parameters as a plain nested dict (logical-axis boxes removed)."""
  return nn.unbox(_init(cfg, rng))["params"]


def logical_axes(cfg: ModelConfig) -> dict:
  """The parameter tree with a PartitionSpec of logical axis names at every leaf."""
  return nn.get_partition_spec(jax.eval_shape(lambda: _init(cfg, jax.random.key(0))))["params"]


def decoding_layout(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
  """The same model laid out for memory-bound decoding on a CPU: each layer its own weights (`scan_layers` off;
  XLA:CPU would copy a stacked layer's weights out of the stack before each matmul) and a tied LM head as its
  own [hidden, vocab] kernel (the embedding's transpose, which the head's matmul reads faster). The copies are
  made once, here: the body's weights, and the head's when tied."""
  layers = params["layers"]
  out = {k: v for k, v in params.items() if k != "layers"}
  out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(cfg.num_hidden_layers)})
  if cfg.tie_word_embeddings:
    out["lm_head"] = {"kernel": jnp.asarray(params["embed_tokens"]["embedding"]).T}  # a transposed copy
  return cfg.replace(scan_layers=False, tie_word_embeddings=False), out
