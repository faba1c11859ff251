"""A model loaded for inference: (ModelConfig, host parameters, tokenizer with the four special tokens).

Two sources: a Hugging Face directory (exported from o1jax, or a plain backbone) and a checkpoint directory of
`python -m o1jax.train`. A checkpoint is enough on its own: its `run/` files give the config, architecture and
tokenizer, and only params (+ LoRA adapters, merged) are restored, as host arrays, whatever mesh or number of
processes saved them. A checkpoint directory may be in an object store (`gs://...`); a Hugging Face directory is
read from the local disk.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from o1jax import checkpoint, lora, storage
from o1jax.convert import load_hf
from o1jax.model import ModelConfig, init_params
from o1jax.tokenizer import SpecialIds, add_special_tokens, load_tokenizer


def _with_token_ids(cfg: ModelConfig, tokenizer: Any) -> ModelConfig:
  """Fills BOS / EOS / PAD ids the architecture lacks (random-init models) from the tokenizer, so generation
  stops at EOS in o1jax and transformers alike."""
  special = SpecialIds.from_tokenizer(tokenizer)
  return cfg.replace(
      bos_token_id=cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id,
      eos_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else special.eos,
      pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else special.pad)


@dataclasses.dataclass(frozen=True)
class CheckpointWeights:
  """One saved step as trained: parameters with the LoRA adapters beside them, not merged."""
  step: int
  config: ml_collections.ConfigDict  # the run's train config (run/train_config.json)
  model_cfg: ModelConfig
  tokenizer: Any
  params: dict  # host arrays
  lora_cfg: lora.LoraConfig | None
  lora: dict | None  # host arrays; None for full fine-tuning

  def merged_params(self) -> dict:
    """The parameters a retriever runs with: adapters folded into the kernels (other leaves shared)."""
    if self.lora_cfg is None:
      return self.params
    return jax.tree.map(np.asarray, lora.merge(self.params, self.lora, self.lora_cfg))


def restore_weights(ckpt_dir: str | os.PathLike, step: int | None = None) -> CheckpointWeights:
  """Params and LoRA adapters (no optimizer state) of a training checkpoint's step (default the latest), with its
  run files: one read of each."""
  config, model_cfg, tokenizer = checkpoint.load_run_files(str(ckpt_dir))
  model_cfg = _with_token_ids(model_cfg, tokenizer)
  abstract = {"params": jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))}
  lora_cfg = lora.LoraConfig.from_mapping(config.train.lora) if config.train.finetune == "lora" else None
  if lora_cfg is not None:
    abstract["lora"] = jax.eval_shape(lambda: lora.init(abstract["params"], lora_cfg, jax.random.key(0)))
  step, state = checkpoint.restore_on_host(str(ckpt_dir), abstract, step)
  return CheckpointWeights(step, config, model_cfg, tokenizer, state["params"], lora_cfg, state.get("lora"))


def load_checkpoint_for_inference(ckpt_dir: str | os.PathLike, step: int | None = None
                                  ) -> tuple[ModelConfig, dict, Any]:
  """(ModelConfig, host params with LoRA merged, tokenizer with the special tokens) of a training checkpoint.

  Args:
    ckpt_dir: a `config.checkpoint.dir` of `python -m o1jax.train`.
    step: the saved step to load; default the latest.
  """
  weights = restore_weights(ckpt_dir, step)
  return weights.model_cfg, weights.merged_params(), weights.tokenizer


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
  """Identifies a checkpoint for the embedding cache: its absolute path and every file's name, size and version
  (mtime, or an object's generation; hashing the weights themselves would cost a full read of a 7B checkpoint on
  every start)."""
  root = os.fspath(path) if storage.is_remote(path) else str(pathlib.Path(path).resolve())
  digest = hashlib.sha256(root.encode())
  for name, size, version in storage.walk_files(root):
    digest.update(f"\x00{name}\x00{size}\x00{version}".encode())
  return digest.hexdigest()


def load_pretrained(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, Any, Any]:
  """(ModelConfig, params, tokenizer) in `dtype` of an exported Hugging Face directory (config.json +
  safetensors) or an o1jax checkpoint directory."""
  if storage.is_remote(path):
    if storage.is_file(storage.join(path, "config.json")):
      raise ValueError(f"{path}: a Hugging Face directory in an object store; copy it to a local directory first")
    return _from_checkpoint(os.fspath(path), dtype)
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  if (path / "config.json").is_file():
    cfg, params = load_hf(path, dtype=dtype, param_dtype=dtype)
    tokenizer = load_tokenizer(path)
    # An export of an o1jax model already has the special tokens; a plain backbone gets them mean-initialised.
    cfg, params, _ = add_special_tokens(tokenizer, cfg, params)
    return cfg, params, tokenizer
  return _from_checkpoint(path, dtype)


def _from_checkpoint(path: str | os.PathLike, dtype: str) -> tuple[ModelConfig, Any, Any]:
  cfg, params, tokenizer = load_checkpoint_for_inference(path)
  params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
  return cfg.replace(dtype=dtype, param_dtype=dtype), params, tokenizer
