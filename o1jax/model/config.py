"""Architecture of a decoder from the Llama / Mistral / Qwen2 families, in Hugging Face's vocabulary.

Field names are those of the families' Hugging Face `config.json`, so converting a config is a rename. Runtime
options (dtypes, remat) live here too so one object describes how the model runs.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from o1jax.model.attention import IMPLEMENTATIONS

FAMILIES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# What the inference and benchmark CLIs load a model in and compute in. float16 is a storage dtype here
# (conversion, export, a config's param_dtype): no inference path has been tested or measured in it.
COMPUTE_DTYPES = ("float32", "bfloat16")
# How the model runs rather than what it is: not in a checkpoint's Hugging Face config, set by config.model.<name>
# whatever the weights' source.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention", "unroll_layers")
# Set only by code that also converts the parameters to match (the generator), never by a config.
LAYOUT_FIELDS = ("scan_layers",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Hugging Face `rope_parameters` without `rope_theta`; None means plain RoPE.
  rope_scaling: dict[str, Any] | None = None
  max_position_embeddings: int = 4096
  # Attend only to the last `sliding_window` positions (Mistral); None = full causal attention.
  sliding_window: int | None = None
  attention_bias: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Runtime options (RUNTIME_FIELDS, then LAYOUT_FIELDS).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  attention: str = "auto"  # o1jax.model.attention.IMPLEMENTATIONS
  # The layer loop written out as straight-line code (parameters stay stacked): no per-layer weight slices or
  # stacked residual buffers, so faster steps on CPU, at the cost of a compile time that grows with depth.
  unroll_layers: bool = False
  # False: each layer has its own parameters (`layers_0`, `layers_1`, ...; `decoder.decoding_layout` converts the
  # stacked layout) and its own KV-cache buffers. XLA:CPU copies a stacked layer's weights out of the stack before
  # each matmul, which is most of a memory-bound decoding step; the generator decodes this way.
  scan_layers: bool = True

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    rope_type = (self.rope_scaling or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(f"attention={self.attention!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {', '.join(DTYPES)}")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  def __hash__(self):
    # A static argument of jitted functions; rope_scaling is a dict, so hash the canonical JSON form.
    return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

  def runtime(self) -> dict[str, Any]:
    """The RUNTIME_FIELDS and their values."""
    return {name: getattr(self, name) for name in RUNTIME_FIELDS}

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **runtime) -> ModelConfig:
    """Builds the config from a Hugging Face `config.json` dict (transformers 4.x or 5.x spelling)."""
    family = d.get("model_type")
    if family not in FAMILIES:
      raise ValueError(f"unsupported model_type {family!r} (architectures={d.get('architectures')}); "
                       f"supported: {', '.join(FAMILIES)}")
    if d.get("hidden_act", "silu") != "silu":
      raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; the {family} family uses 'silu'")
    if d.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    if rope.get("rope_type", "default") == "default":
      rope = {}
    sliding_window = d.get("sliding_window")
    if family == "qwen2":
      if d.get("use_sliding_window"):
        raise ValueError("Qwen2 use_sliding_window=True (per-layer windows) is not supported")
      sliding_window = None
    heads = d["num_attention_heads"]
    return cls(
        family=family,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope or None,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        sliding_window=sliding_window,
        # Qwen2 always has q/k/v biases; Llama's are optional (and include o_proj); Mistral has none.
        attention_bias=family == "qwen2" or (family == "llama" and bool(d.get("attention_bias"))),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        **runtime,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` content transformers loads into the matching `*ForCausalLM`."""
    d = {
        "architectures": [ARCHITECTURES[self.family]],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "dtype": self.param_dtype,
    }
    if self.family == "llama":
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = False
    elif self.family == "mistral":
      d["sliding_window"] = self.sliding_window
    else:
      d["use_sliding_window"] = False
      d["sliding_window"] = None
    return d
