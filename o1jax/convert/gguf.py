"""GGUF files (llama.cpp's format) to o1jax parameters.

Only the `llama` GGUF architecture is read (it also covers Mistral-architecture checkpoints, which llama.cpp
writes as `llama`). Quantized tensors (Q4_1, Q8_0, ...) are de-quantized to float32 with `gguf.quants.dequantize`,
one tensor at a time. llama.cpp's converter permutes the rows of the Q and K projections so that GGML can rotate
interleaved pairs (2i, 2i+1); o1jax uses Hugging Face's rotate-half RoPE, so that permutation is undone here.
"""
from __future__ import annotations

import os
import re
from typing import Any

import gguf
import numpy as np

from o1jax.convert import layout
from o1jax.convert.layout import ConversionError, Params
from o1jax.model import ModelConfig

_REQUIRED = object()
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _hf_name(gguf_name: str) -> str:
  """The HF name of a GGUF tensor; unknown names are returned unchanged so they surface as unexpected."""
  if gguf_name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[gguf_name]
  m = _LAYER_NAME.fullmatch(gguf_name)
  if m and m.group(2) in _LAYER_TENSORS:
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
  return gguf_name


def _field(reader: gguf.GGUFReader, key: str, path: str, default: Any = _REQUIRED) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise ConversionError(f"{path}: GGUF metadata key {key!r} is missing")
    return default
  return field.contents()


def hf_config_dict(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
  """A Hugging Face `config.json` dict built from the GGUF metadata."""
  arch = _field(reader, "general.architecture", path)
  if arch != "llama":
    raise ConversionError(f"{path}: unsupported GGUF architecture {arch!r}; supported: 'llama'")
  scaling = _field(reader, "llama.rope.scaling.type", path, "none")
  if scaling != "none":
    raise ConversionError(f"{path}: unsupported GGUF rope scaling {scaling!r} (llama.rope.scaling.type)")
  tensor_names = {t.name for t in reader.tensors}
  heads = _field(reader, "llama.attention.head_count", path)
  hidden = _field(reader, "llama.embedding_length", path)
  vocab = _field(reader, "llama.vocab_size", path, None)
  if vocab is None:
    vocab = len(_field(reader, "tokenizer.ggml.tokens", path))
  return {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": _field(reader, "llama.feed_forward_length", path),
      "num_hidden_layers": _field(reader, "llama.block_count", path),
      "num_attention_heads": heads,
      "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", path, heads),
      "head_dim": _field(reader, "llama.rope.dimension_count", path, hidden // heads),
      "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
      "rope_theta": float(_field(reader, "llama.rope.freq_base", path, 10000.0)),
      "max_position_embeddings": _field(reader, "llama.context_length", path),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", path, None),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", path, None),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", path, None),
  }


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation: per head, rows (pair j, half h) go back to (half h, pair j)."""
  rows = weight.shape[0]
  w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
  return w.swapaxes(1, 2).reshape(weight.shape)


def load_gguf(path: str | os.PathLike, **runtime) -> tuple[ModelConfig, Params]:
  """Loads a llama-architecture GGUF file as (ModelConfig, params), de-quantizing to `param_dtype`."""
  path = os.fspath(path)
  try:
    reader = gguf.GGUFReader(path)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: not a readable GGUF file: {e}") from e
  try:
    cfg = ModelConfig.from_hf_dict(hf_config_dict(reader, path), **runtime)
  except (KeyError, ValueError) as e:
    raise ConversionError(f"{path}: {e}") from e
  tensors = {_hf_name(t.name): t for t in reader.tensors}

  def read(name: str) -> np.ndarray:
    t = tensors[name]
    try:
      weight = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise ConversionError(f"{path}: tensor {t.name!r}: cannot de-quantize {t.tensor_type.name}: {e}") from e
    # GGUF lists dimensions innermost first; numpy (and HF) outermost first.
    weight = weight.reshape(tuple(int(d) for d in reversed(t.shape)))
    if name.endswith("self_attn.q_proj.weight"):
      weight = _unpermute_rows(weight, cfg.num_attention_heads)
    elif name.endswith("self_attn.k_proj.weight"):
      weight = _unpermute_rows(weight, cfg.num_key_value_heads)
    return weight

  return cfg, layout.assemble(cfg, tensors, read, path)
