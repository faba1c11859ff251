"""Paired comparison of two systems on the same queries: wins / ties / losses, the mean difference with its
confidence interval, the paired randomization test and the paired t-test (both from scipy.stats).

`compare` takes two `{query id: value}` dicts of one measure (e.g. `Evaluation.per_query["ndcg@10"]`); differences
are A - B. The randomization test flips the sign of each query's difference (swaps A and B within the pair) and
compares the mean difference with its distribution under those flips: exact (all 2^n flips) when 2^n is at most
`permutations`, else `permutations` random flips. `python -m o1jax.eval.compare` runs it on two TREC run files.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import scipy.stats

# Sign flips are drawn in batches of about this many values, so memory stays bounded for any number of queries.
_BATCH_VALUES = 4_000_000


@dataclasses.dataclass(frozen=True)
class Comparison:
  """System A against system B on one measure over the same queries; differences are A - B."""
  measure: str
  names: tuple[str, str]
  queries: int
  wins: int  # queries where A scores above B
  ties: int
  losses: int
  mean_a: float
  mean_b: float
  mean_difference: float
  confidence: float
  # The t-test and its interval are undefined (None) when every query's difference is the same.
  ci_low: float | None
  ci_high: float | None
  t_statistic: float | None
  t_pvalue: float | None
  randomization_pvalue: float
  randomization_exact: bool
  permutations: int  # sign-flip assignments the randomization p-value is over (2^n when exact)
  seed: int


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
  return np.mean(a - b, axis=axis)


def _sample(ids: list[str]) -> str:
  return ", ".join(repr(q) for q in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def check_same_queries(a: Mapping[str, object], b: Mapping[str, object], names: tuple[str, str]) -> None:
  """Raises ValueError naming the queries only one side has."""
  only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  if only_a or only_b:
    sides = [f"{len(ids)} only in {name} ({_sample(ids)})" for ids, name in ((only_a, names[0]), (only_b, names[1]))
             if ids]
    raise ValueError(f"{names[0]} and {names[1]} cover different queries: {'; '.join(sides)}")


def compare(a: Mapping[str, float], b: Mapping[str, float], *, measure: str = "", names: tuple[str, str] = ("A", "B"),
            confidence: float = 0.95, permutations: int = 100_000, seed: int = 0) -> Comparison:
  """Paired comparison of per-query values `a` and `b` (same query ids). The random sign flips depend only on
  `seed` and the sorted query ids, so the same inputs give the same p-value."""
  check_same_queries(a, b, names)
  if len(a) < 2:
    raise ValueError(f"a paired comparison needs at least 2 queries, got {len(a)}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence}: must be in (0, 1)")
  if permutations < 1:
    raise ValueError(f"permutations={permutations}: must be >= 1")
  query_ids = sorted(a)
  x = np.array([a[q] for q in query_ids], np.float64)
  y = np.array([b[q] for q in query_ids], np.float64)
  for values, name in ((x, names[0]), (y, names[1])):
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{name}: query {query_ids[int(np.argmin(np.isfinite(values)))]!r} has a non-finite value")
  differences = x - y
  exact = 2 ** len(query_ids) <= permutations
  randomization = scipy.stats.permutation_test(
      (x, y), _mean_difference, permutation_type="samples", vectorized=True, n_resamples=permutations,
      batch=max(1, _BATCH_VALUES // len(query_ids)), alternative="two-sided", rng=np.random.default_rng(seed))
  ci_low = ci_high = t_statistic = t_pvalue = None
  if np.any(differences != differences[0]):
    t_test = scipy.stats.ttest_rel(x, y)
    interval = t_test.confidence_interval(confidence_level=confidence)
    ci_low, ci_high = float(interval.low), float(interval.high)
    t_statistic, t_pvalue = float(t_test.statistic), float(t_test.pvalue)
  return Comparison(
      measure=measure, names=tuple(names), queries=len(query_ids), wins=int(np.sum(differences > 0)),
      ties=int(np.sum(differences == 0)), losses=int(np.sum(differences < 0)), mean_a=float(x.mean()),
      mean_b=float(y.mean()), mean_difference=float(differences.mean()), confidence=confidence, ci_low=ci_low,
      ci_high=ci_high, t_statistic=t_statistic, t_pvalue=t_pvalue,
      randomization_pvalue=float(randomization.pvalue), randomization_exact=exact,
      permutations=2 ** len(query_ids) if exact else permutations, seed=seed)
