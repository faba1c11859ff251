"""Refinement committee (METHOD §5): members score every candidate thought against the query's positive.

Members:
  * `BM25Member`: the positive is the query, the k candidates are the corpus (bm25s).
  * `DenseMember`: score = 100 x cosine(positive, thought) with any encoder `texts -> L2-normalized [n, d]`;
    `sentence_transformer_member` builds one from a sentence-transformers model (default all-MiniLM-L6-v2).
    An o1jax checkpoint joins the committee the same way: pass its document embedder (`<emb>` hidden state,
    METHOD §1) as `encode` -- that is the seam the trainer's checkpoints plug into.
The committee returns the full [members, k] score matrix so records keep every member's scores.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Protocol

import numpy as np

from data_tools import vote as vote_lib

Encoder = Callable[[list[str]], np.ndarray]  # texts -> [n, d] L2-normalized float32


class Member(Protocol):
  name: str

  def score(self, positives: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
    """[n, k] scores of candidates[i][j] against positives[i]."""
    ...


def _check_rectangular(positives: Sequence[str], candidates: Sequence[Sequence[str]]) -> int:
  if len(positives) != len(candidates):
    raise ValueError(f"{len(positives)} positives but {len(candidates)} candidate lists")
  sizes = {len(c) for c in candidates}
  if len(sizes) > 1:
    raise ValueError(f"every query needs the same number of candidates, got sizes {sorted(sizes)}")
  return sizes.pop() if sizes else 0


class BM25Member:
  """BM25 of each candidate (as a one-of-k document) for the positive (as the query)."""

  def __init__(self, name: str = "bm25"):
    from o1jax.retrieval.bm25 import bm25_scores  # pylint: disable=g-import-not-at-top
    self.name, self._bm25_scores = name, bm25_scores

  def score(self, positives: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
    k = _check_rectangular(positives, candidates)
    out = np.zeros((len(positives), k), np.float32)
    for i, (positive, cands) in enumerate(zip(positives, candidates)):
      out[i] = self._bm25_scores(positive, list(cands))
    return out


class DenseMember:
  """100 x cosine(positive, candidate) under an encoder of L2-normalized vectors."""

  def __init__(self, name: str, encode: Encoder):
    self.name, self._encode = name, encode

  def score(self, positives: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
    k = _check_rectangular(positives, candidates)
    vectors = self._encode(list(positives) + [c for cands in candidates for c in cands])
    pos, cand = vectors[:len(positives)], vectors[len(positives):].reshape(len(positives), k, -1)
    return 100.0 * np.einsum("nd,nkd->nk", pos, cand).astype(np.float32)


def sentence_transformer_member(model_name_or_path: str | None = None, batch_size: int = 64,
                                name: str | None = None) -> DenseMember:
  """A sentence-transformers model as a member; None is the offline all-MiniLM-L6-v2."""
  from o1jax.retrieval.sentence_encoder import SentenceEncoder  # pylint: disable=g-import-not-at-top (loads torch)
  encoder = SentenceEncoder(model_name_or_path)
  return DenseMember(name or f"st:{model_name_or_path or 'all-MiniLM-L6-v2'}",
                     lambda texts: encoder.encode(texts, batch_size))


@dataclasses.dataclass(frozen=True)
class Verdict:
  winner: int
  scores: np.ndarray  # [members, k] raw member scores
  totals: np.ndarray  # [k] what the vote maximized


class Committee:
  """Scores candidates with every member and votes (soft or hard, weights per member)."""

  def __init__(self, members: Sequence[Member], weights: Sequence[float] | None = None, vote: str = "soft"):
    if not members:
      raise ValueError("a committee needs at least one member")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
      raise ValueError(f"member names must be unique, got {names}")
    self.members, self.vote = list(members), vote
    self.weights = np.ones(len(members)) if weights is None else np.asarray(weights, np.float64)
    if self.weights.shape != (len(members),):
      raise ValueError(f"expected {len(members)} weights for members {names}, got {list(weights)}")
    if vote not in vote_lib.VOTES:
      raise ValueError(f"unknown vote {vote!r}; expected one of {vote_lib.VOTES}")

  @property
  def names(self) -> list[str]:
    return [m.name for m in self.members]

  def judge(self, positives: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[Verdict]:
    """One verdict per query; `positives[i]` is the query's (first) positive passage.

    Queries may have different numbers of candidates (empty answers are dropped before the vote): members score
    each group of queries with the same number at once.
    """
    if len(positives) != len(candidates):
      raise ValueError(f"{len(positives)} positives but {len(candidates)} candidate lists")
    groups: dict[int, list[int]] = {}
    for i, cands in enumerate(candidates):
      if not cands:
        raise ValueError(f"query {i} of the batch has no candidate to vote on")
      groups.setdefault(len(cands), []).append(i)
    verdicts: list[Verdict | None] = [None] * len(positives)
    for rows in groups.values():
      group_positives, group_candidates = [positives[i] for i in rows], [candidates[i] for i in rows]
      scores = np.stack([m.score(group_positives, group_candidates) for m in self.members], axis=1)  # [n, M, k]
      for i, per_query in zip(rows, scores):
        result = vote_lib.vote(self.vote, per_query, self.weights)
        verdicts[i] = Verdict(result.winner, per_query, result.totals)
    return verdicts
