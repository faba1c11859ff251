"""Committee votes that pick one of k candidate thoughts (METHOD §5, refinement).

`scores[m, c]` is member m's score of candidate c against the query's positive document. Member scales
differ (BM25 is unbounded, cosine x 100 is not), which is why the soft vote normalizes within each member
before members are combined.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

VOTES = ("soft", "hard")


@dataclasses.dataclass(frozen=True)
class VoteResult:
  winner: int  # index of the chosen candidate
  totals: np.ndarray  # [k] float64: per-candidate total the winner maximizes


def _check(scores: np.ndarray, weights: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
    raise ValueError(f"scores must be [members, candidates] and non-empty, got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"scores must be finite, got {scores.tolist()}")
  w = np.ones(scores.shape[0]) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (scores.shape[0],):
    raise ValueError(f"expected {scores.shape[0]} member weights, got {w.tolist()}")
  return scores, w


def _first_argmax(totals: np.ndarray) -> int:
  # np.argmax already returns the first maximum; spelled out because ties-to-first is the contract.
  return int(np.flatnonzero(totals == totals.max())[0])


def soft_vote(scores: np.ndarray, weights: Sequence[float] | None = None) -> VoteResult:
  """Softmax over candidates within each member, weighted sum over members, argmax (ties to the first)."""
  scores, w = _check(scores, weights)
  shifted = scores - scores.max(axis=1, keepdims=True)
  probs = np.exp(shifted)
  probs /= probs.sum(axis=1, keepdims=True)
  totals = w @ probs
  return VoteResult(_first_argmax(totals), totals)


def hard_vote(scores: np.ndarray, weights: Sequence[float] | None = None) -> VoteResult:
  """Each member votes (with its weight) for its top candidate (first on ties); most votes wins, ties to first."""
  scores, w = _check(scores, weights)
  totals = np.zeros(scores.shape[1])
  for member_scores, member_weight in zip(scores, w):
    totals[_first_argmax(member_scores)] += member_weight
  return VoteResult(_first_argmax(totals), totals)


def vote(kind: str, scores: np.ndarray, weights: Sequence[float] | None = None) -> VoteResult:
  if kind == "soft":
    return soft_vote(scores, weights)
  if kind == "hard":
    return hard_vote(scores, weights)
  raise ValueError(f"unknown vote {kind!r}; expected one of {VOTES}")
