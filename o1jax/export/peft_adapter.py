"""A LoRA run as a PEFT adapter directory: `adapter_config.json` + `adapter_model.safetensors` (+ the tokenizer).

`peft.PeftModel.from_pretrained(base, dir)` loads it on the run's base model. o1jax's LoRA is PEFT's: per target
projection y = x W + (alpha / r) x A B, with A [layers, in, r] and B [layers, r, out] stacked on the layer axis,
so each layer's `lora_A.weight` is A[l].T ([r, in]) and `lora_B.weight` is B[l].T ([out, r]).

The four special tokens are rows the base model does not have (or has at values other than the run's). The adapter
carries them, so it applies to any copy of the base whose vocabulary was grown to the tokenizer's size, whatever
values the grown rows got: the rows of the special tokens in the embeddings and in an untied LM head as PEFT
trainable tokens (`trainable_token_indices`, which replace those rows), or, when the run trained the whole
embedding matrices, the matrices themselves (`modules_to_save`). A tied LM head follows the embeddings in both.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from o1jax import lora
from o1jax.convert import layout
from o1jax.model import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's names of a PeftModelForCausalLM's tensors: the wrapped model's names under this prefix.
PREFIX = "base_model.model."
EMBEDDINGS = ("embed_tokens", "embedding")
LM_HEAD = ("lm_head", "kernel")


def _module(entry: layout.Entry) -> str:
  return entry.hf_name.removesuffix(".weight")


def _embedding_entries(cfg: ModelConfig) -> list[layout.Entry]:
  """The embeddings and, when untied, the LM head: the tensors with one row per token."""
  return [e for e in layout.entries(cfg) if e.path in (EMBEDDINGS, LM_HEAD)]


def adapter_config(cfg: ModelConfig, lora_cfg: lora.LoraConfig, token_ids: Sequence[int], full_embeddings: bool,
                   base_model: str | None) -> dict[str, Any]:
  """The adapter_config.json of a LoRA run (PEFT fills every other field with its default)."""
  # PEFT names modules by their last component: `embed_tokens`, `lm_head`.
  names = [_module(e).rsplit(".", 1)[-1] for e in _embedding_entries(cfg)]
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": lora_cfg.rank,
      "lora_alpha": lora_cfg.alpha,
      "lora_dropout": lora_cfg.dropout,
      "target_modules": list(lora_cfg.targets),
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": names if full_embeddings else None,
      "trainable_token_indices": None if full_embeddings else {name: list(token_ids) for name in names},
      # A tied LM head follows trainable tokens by itself, but a saved embedding matrix only when asked to.
      "ensure_weight_tying": cfg.tie_word_embeddings and full_embeddings,
  }


def adapter_tensors(cfg: ModelConfig, params: dict, adapters: dict, lora_cfg: lora.LoraConfig,
                    token_ids: Sequence[int], full_embeddings: bool, dtype: str) -> dict[str, np.ndarray]:
  """PEFT-named tensors in `dtype`: LoRA A and B of every target in every layer, then the token rows (or whole
  matrices) of the embeddings and an untied LM head, read from the run's `params`."""
  cast = jnp.dtype(dtype)
  tensors = {}
  for e in layout.entries(cfg):
    if e.path[0] != "layers" or e.path[2] not in lora_cfg.targets or e.path[-1] != "kernel":
      continue
    adapter = adapters["layers"][e.path[1]][e.path[2]]
    for name, matrix in (("lora_A", adapter[lora.A]), ("lora_B", adapter[lora.B])):
      tensors[f"{PREFIX}{_module(e)}.{name}.weight"] = np.ascontiguousarray(
          np.asarray(matrix[e.layer]).T.astype(cast))
  for e in _embedding_entries(cfg):
    rows = layout.hf_tensor(params, e)
    if full_embeddings:
      tensors[f"{PREFIX}{e.hf_name}"] = rows.astype(cast)
      if cfg.tie_word_embeddings:
        # PEFT saves the tied LM head's copy too, and expects it when loading.
        tensors[f"{PREFIX}lm_head.weight"] = rows.astype(cast)
    else:
      tensors[f"{PREFIX}{_module(e)}.token_adapter.trainable_tokens_delta"] = rows[list(token_ids)].astype(cast)
  return tensors


def save_adapter(out: pathlib.Path, cfg: ModelConfig, params: dict, adapters: dict, lora_cfg: lora.LoraConfig,
                 tokenizer: Any, token_ids: Sequence[int], full_embeddings: bool, base_model: str | None,
                 dtype: str) -> pathlib.Path:
  """Writes the adapter directory `out` (which must not exist); returns it.

  Args:
    cfg: the architecture; `params` are the run's parameters without the adapters merged in.
    adapters: the run's LoRA tree (`lora.A`, `lora.B` per target).
    tokenizer: saved beside the adapter: `peft.AutoPeftModelForCausalLM` grows the base's vocabulary to its size.
    token_ids: the special tokens' ids.
    full_embeddings: the run trained the whole embedding matrices (config.train.train_embeddings).
    base_model: the base model's path, recorded as `base_model_name_or_path`.
  """
  out.mkdir()
  config = adapter_config(cfg, lora_cfg, token_ids, full_embeddings, base_model)
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  tensors = adapter_tensors(cfg, params, adapters, lora_cfg, token_ids, full_embeddings, dtype)
  safetensors.numpy.save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
  # safetensors creates its files owner-only; the rest of the export is world-readable like save_pretrained's.
  (out / WEIGHTS_FILE).chmod(0o644)
  tokenizer.save_pretrained(out)
  return out
