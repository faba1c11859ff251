"""Tokenizers of the backbone and the O1 Embedder special tokens.

`add_special_tokens` adds `<query>`, `</query>`, `<thought>`, `<emb>` (in this order, as special tokens that are
never split) and grows the embedding matrix and an untied LM head to match; rows of the new tokens start at the
mean of the rows of the tokens the tokenizer already had, a better start than random for frozen embeddings.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import transformers

from o1jax.model import ModelConfig

SPECIAL_TOKENS = ("<query>", "</query>", "<thought>", "<emb>")


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None) -> Any:
  """A transformers tokenizer from a Hugging Face directory, or from the GGUF file `gguf_file` inside `path`.

  `path` may also be the GGUF file itself.
  """
  path = pathlib.Path(path)
  if gguf_file is None and path.suffix == ".gguf":
    path, gguf_file = path.parent, path.name
  return transformers.AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Token ids the sequence templates need.

  bos is the id the tokenizer prepends to every encoding, None when it prepends none (e.g. Qwen, SmolLM2);
  pad falls back to eos for tokenizers without a pad token (padding is always masked).
  """
  query: int
  query_end: int
  thought: int
  emb: int
  eos: int
  bos: int | None
  pad: int

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> SpecialIds:
    vocab = tokenizer.get_vocab()
    absent = [t for t in SPECIAL_TOKENS if t not in vocab]
    if absent:
      raise ValueError(f"tokenizer lacks the special tokens {absent}; call add_special_tokens first")
    if tokenizer.eos_token_id is None:
      raise ValueError("tokenizer has no eos_token")
    query, query_end, thought, emb = (vocab[t] for t in SPECIAL_TOKENS)
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return cls(query, query_end, thought, emb, tokenizer.eos_token_id, bos, pad)


def _grow_rows(matrix: jnp.ndarray, rows: int, new_ids: list[int], mean_of: int, row_axis: int) -> jnp.ndarray:
  """`matrix` grown to `rows` rows along `row_axis`; added rows and rows `new_ids` = mean of rows [0, mean_of)."""
  m = jnp.moveaxis(matrix, row_axis, 0)
  mean = m[:mean_of].astype(jnp.float32).mean(axis=0).astype(m.dtype)
  if rows > m.shape[0]:
    m = jnp.concatenate([m, jnp.broadcast_to(mean, (rows - m.shape[0],) + mean.shape)])
  if new_ids:
    m = m.at[jnp.asarray(new_ids)].set(mean)
  return jnp.moveaxis(m, 0, row_axis)


def add_special_tokens(tokenizer: Any, cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict, SpecialIds]:
  """Adds SPECIAL_TOKENS to `tokenizer` (in place) and resizes embeddings / LM head to match.

  Tokens already present keep their ids and rows. The vocabulary only grows (a checkpoint's padded vocabulary
  larger than the tokenizer is kept), so existing token ids never move.

  Returns:
    (new config, new params, SpecialIds of the tokenizer).
  """
  known = len(tokenizer)
  vocab = tokenizer.get_vocab()
  fresh = [t for t in SPECIAL_TOKENS if t not in vocab]
  if fresh:
    tokenizer.add_special_tokens({"extra_special_tokens": fresh}, replace_extra_special_tokens=False)
  vocab = tokenizer.get_vocab()
  new_ids = [vocab[t] for t in fresh]
  rows = max(cfg.vocab_size, len(tokenizer))
  params = dict(params)
  if new_ids or rows != cfg.vocab_size:
    mean_of = min(known, cfg.vocab_size)
    params["embed_tokens"] = {"embedding": _grow_rows(params["embed_tokens"]["embedding"], rows, new_ids,
                                                      mean_of, row_axis=0)}
    if not cfg.tie_word_embeddings:
      params["lm_head"] = {"kernel": _grow_rows(params["lm_head"]["kernel"], rows, new_ids, mean_of, row_axis=1)}
  return cfg.replace(vocab_size=rows), params, SpecialIds.from_tokenizer(tokenizer)
