"""Token-level sequence templates of the O1 Embedder (METHOD §2), shared by training, data tools and evaluation.

  query, training:   [BOS] <query> q </query> <thought> t EOS <emb>    (thought dropped: ... <thought> <emb>)
  query, inference:  [BOS] <query> q </query> <thought>                 -> generate t -> + t EOS <emb>
  document:          [BOS] title text <emb>

Sequences are built from token ids and never decoded and re-tokenized. Every length limit counts the whole
sequence including `<emb>`, which is appended after truncation so it is always present; fixed-shape batches are
then exactly `length` wide.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from o1jax.tokenizer import SpecialIds


# [BOS] <query> q </query> <thought> t EOS <emb> around a query of `lengths.query` tokens and a 1-token thought.
QUERY_TEMPLATE_TOKENS = 7
DOC_TEMPLATE_TOKENS = 3  # [BOS] text <emb> with a 1-token text


@dataclasses.dataclass(frozen=True)
class Lengths:
  """Token budgets (reference values of METHOD §2, `<emb>` included)."""
  query: int = 32  # the query text alone
  query_thought: int = 256  # the whole query sequence
  doc: int = 192


def _prefix(special: SpecialIds) -> list[int]:
  return [] if special.bos is None else [special.bos]


def query_prefix(query_ids: Sequence[int], special: SpecialIds, lengths: Lengths) -> list[int]:
  """What the model continues to think: [BOS] <query> q </query> <thought>."""
  return _prefix(special) + [special.query, *query_ids[:lengths.query], special.query_end, special.thought]


def thought_until_eos(thought_ids: Sequence[int], special: SpecialIds) -> list[int]:
  """Generated ids cut before the first EOS (generation may or may not have produced one)."""
  thought = list(thought_ids)
  return thought[:thought.index(special.eos)] if special.eos in thought else thought


def query_sequence(query_ids: Sequence[int], thought_ids: Sequence[int] | None, special: SpecialIds,
                   lengths: Lengths) -> tuple[list[int], list[int]]:
  """A query with its thought (or none) and the behavior-cloning mask (1 on thought tokens and their EOS).

  An empty or None thought gives the thought-dropped form with an all-zero mask.
  """
  prefix = query_prefix(query_ids, special, lengths)
  thought = thought_until_eos(thought_ids or [], special)
  body = prefix + (thought + [special.eos] if thought else [])
  body = body[:lengths.query_thought - 1]
  mask = [0] * len(prefix) + [1] * (len(body) - len(prefix))
  return body + [special.emb], mask[:len(body)] + [0]


def document_sequence(doc_ids: Sequence[int], special: SpecialIds, length: int) -> list[int]:
  """[BOS] title text, truncated so that with `<emb>` it fits `length`."""
  return (_prefix(special) + list(doc_ids))[:length - 1] + [special.emb]


def document_text(title: str, text: str) -> str:
  """METHOD §2's `title text`, stripped as BEIR and MTEB feed documents to encoders, so an empty title adds
  nothing and every o1jax row and baseline embeds the same text."""
  return f"{title} {text}".strip()


def pad_right(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded ids and mask [N, length] int32; a sequence longer than `length` is an error, not a cut."""
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for row, seq in enumerate(sequences):
    if len(seq) > length:
      raise ValueError(f"sequence {row} has {len(seq)} tokens, more than the padded length {length}")
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return ids, mask
