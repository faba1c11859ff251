"""Where a run's model and training records come from: weights and tokenizer, or shapes alone; records.

  source 'random'  a freshly initialised model of `arch` with the synthetic data's generated tokenizer
  source 'hf'      a Hugging Face directory (safetensors; onto a mesh, each process reads only its devices' slices)
  source 'gguf'    a GGUF file
The four special tokens are added to a loaded tokenizer (and their embedding rows to the weights) as needed.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import logging
from typing import Any

import jax
from jax.sharding import Mesh

from o1jax import sharding
from o1jax.convert import load_gguf, load_hf
from o1jax.convert.hf import load_hf_sharded
from o1jax.data import pipeline, synthetic
from o1jax.model import ModelConfig
from o1jax.tokenizer import SPECIAL_TOKENS, SpecialIds, add_special_tokens, load_tokenizer
from o1jax.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class ModelSource:
  source: str  # 'random' | 'hf' | 'gguf'
  path: str
  # The architecture for 'random' and for shape-only compilation (vocab_size 0: the tokenizer's size); ignored
  # when weights are loaded, whose own config is used. Its runtime fields (ModelConfig.runtime) apply to every
  # source.
  arch: ModelConfig


@dataclasses.dataclass(frozen=True)
class DataSource:
  kind: str  # 'synthetic' | 'tfrecord'
  train_files: tuple[str, ...] = ()
  skip_bad: bool = False
  synthetic: synthetic.SyntheticSpec = synthetic.SyntheticSpec()


def build_model(model: ModelSource, data: DataSource, mesh: Mesh | None = None
                ) -> tuple[ModelConfig, Any, Any, SpecialIds]:
  """(ModelConfig, params or None for random init, tokenizer, SpecialIds).

  With `mesh`, params are global arrays in the trainer's shardings (`state.param_shardings`): from a Hugging Face
  directory each process reads only the slices of the tensors that its devices hold; a GGUF file is read whole by
  every process and then placed. Without a mesh, params are host arrays. Every process must call this.
  """
  if model.source == "random":
    tokenizer = synthetic.make_tokenizer(data.synthetic)
    return model.arch.replace(vocab_size=len(tokenizer)), None, tokenizer, SpecialIds.from_tokenizer(tokenizer)
  arch = model.arch
  runtime = arch.runtime()
  if mesh is None:
    model_cfg, params = (load_hf if model.source == "hf" else load_gguf)(model.path, **runtime)
  elif model.source == "hf":
    model_cfg, params = load_hf_sharded(model.path, lambda cfg: state_lib.param_shardings(cfg, mesh), **runtime)
  else:
    model_cfg, params = load_gguf(model.path, **runtime)
    params = sharding.place(params, state_lib.param_shardings(model_cfg, mesh))
  tokenizer = load_tokenizer(model.path)
  model_cfg, params, special = add_special_tokens(tokenizer, model_cfg, params)
  if mesh is not None:  # new embedding rows change the vocabulary's shape, and with it possibly its sharding
    params = jax.device_put(params, state_lib.param_shardings(model_cfg, mesh))
  return model_cfg, params, tokenizer, special


def shape_only_model(model: ModelSource, data: DataSource) -> tuple[ModelConfig, SpecialIds]:
  """The ModelConfig and special ids a real run would have, without reading weights (AOT, benchmarks).

  'random' builds its generated tokenizer exactly as training does. For checkpoints, `arch.vocab_size` is taken
  as the tokenizer's size: add_special_tokens appends the four special tokens after it, as a real run does for
  a tokenizer that lacks them.
  """
  if model.source == "random":
    model_cfg, _, _, special = build_model(model, data)
    return model_cfg, special
  vocab = model.arch.vocab_size
  if not vocab:
    raise ValueError("config.model.arch.vocab_size=0: compiling from shapes needs the checkpoint's vocabulary size")
  model_cfg = model.arch.replace(vocab_size=vocab + len(SPECIAL_TOKENS))
  eos = model_cfg.eos_token_ids[0] if model_cfg.eos_token_ids else 0
  special = SpecialIds(query=vocab, query_end=vocab + 1, thought=vocab + 2, emb=vocab + 3, eos=eos,
                       bos=model_cfg.bos_token_id, pad=eos)
  return model_cfg, special


def load_records(data: DataSource, process_index: int = 0, process_count: int = 1) -> Sequence[dict]:
  """The training records: generated, or indexed TFRecord shards read on demand (globs or manifest.json)."""
  if data.kind == "synthetic":
    return synthetic.make_records(data.synthetic)
  source = pipeline.open_source(data.train_files, skip_bad=data.skip_bad, process_index=process_index,
                                process_count=process_count)
  for skipped in source.skipped:
    logging.warning("skipped a bad training record: %s", skipped)
  return source
