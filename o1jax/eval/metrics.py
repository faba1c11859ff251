"""trec_eval metrics through `pytrec_eval`, averaged over every judged query (a query with no results scores 0).

Measure names: the four defaults `ndcg@10`, `mrr@10`, `recall@100`, `recall@1000`; `mrr@k` (trec_eval's
`recip_rank` on the run cut at k, since `recip_rank` itself has no cutoff); `ndcg@k`, `recall@k`, `p@k`, `map@k`
(aliases of `ndcg_cut_k`, `recall_k`, `P_k`, `map_cut_k`); and any trec_eval measure by its output name
(`map`, `recip_rank`, `P_5`, `ndcg_cut_20`, `bpref`, ...).

`relevance_level` is trec_eval's `-l`: the lowest grade that counts as relevant for the binary measures (MRR,
recall, P, MAP); nDCG always uses the graded judgements. TREC DL reports MRR and recall at level 2.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pytrec_eval

from o1jax.eval.run_file import Run, cut_run

Qrels = dict[str, dict[str, int]]
DEFAULT_MEASURES = ("ndcg@10", "mrr@10", "recall@100", "recall@1000")
_ALIASES = {"ndcg": "ndcg_cut", "recall": "recall", "p": "P", "map": "map_cut"}


def trec_name(measure: str) -> tuple[str, str, int | None]:
  """(pytrec_eval request, pytrec_eval output key, run cutoff or None) for a measure name."""
  match = re.fullmatch(r"(\w+)@(\d+)", measure)
  if match:
    family, k = match.group(1).lower(), int(match.group(2))
    if family == "mrr":
      return "recip_rank", "recip_rank", k
    if family in _ALIASES:
      return f"{_ALIASES[family]}.{k}", f"{_ALIASES[family]}_{k}", None
    raise ValueError(f"unknown measure {measure!r}; @k works for mrr, {', '.join(_ALIASES)}")
  if measure in pytrec_eval.supported_measures:
    return measure, measure, None
  family, _, param = measure.rpartition("_")
  if family in pytrec_eval.supported_measures and param:
    return f"{family}.{param}", measure, None
  raise ValueError(f"unknown measure {measure!r}; trec_eval knows {sorted(pytrec_eval.supported_measures)}")


def _check(qrels: Qrels, run: Run) -> None:
  if not qrels:
    raise ValueError("empty qrels: nothing to evaluate")
  for qid, docs in run.items():
    for doc_id, score in docs.items():
      if not np.isfinite(score):
        raise ValueError(f"run score for query {qid!r}, doc {doc_id!r} is not finite: {score}")


def evaluate_per_query(qrels: Qrels, run: Run, measures: Sequence[str] = DEFAULT_MEASURES,
                       relevance_level: int = 1) -> dict[str, dict[str, float]]:
  """`{measure: {query id: value}}` over every query in `qrels`; queries missing from the run get 0."""
  _check(qrels, run)
  if relevance_level < 1:
    raise ValueError(f"relevance_level must be >= 1, got {relevance_level}")
  parsed = {m: trec_name(m) for m in measures}
  # trec_eval ignores queries without judgements; drop them here too so they cannot leak into a cut run.
  run = {qid: docs for qid, docs in run.items() if qid in qrels and docs}
  by_cutoff: dict[int | None, list[str]] = {}
  for measure, (_, _, cutoff) in parsed.items():
    by_cutoff.setdefault(cutoff, []).append(measure)
  result: dict[str, dict[str, float]] = {}
  for cutoff, names in by_cutoff.items():
    requests = {parsed[m][0] for m in names}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, requests, relevance_level=relevance_level)
    scored = evaluator.evaluate(run if cutoff is None else cut_run(run, cutoff))
    for measure in names:
      key = parsed[measure][1]
      result[measure] = {qid: float(scored[qid][key]) if qid in scored else 0.0 for qid in qrels}
  return {measure: result[measure] for measure in measures}  # in the order asked: the table's column order


def evaluate(qrels: Qrels, run: Run, measures: Sequence[str] = DEFAULT_MEASURES,
             relevance_level: int = 1) -> dict[str, float]:
  """Mean of each measure over every query in `qrels` (trec_eval -c semantics)."""
  per_query = evaluate_per_query(qrels, run, measures, relevance_level)
  return {measure: float(np.mean(list(values.values()))) for measure, values in per_query.items()}
