"""Benchmark suites: the measures, relevance level and judged-document rule each benchmark is reported with.

  beir     nDCG@10 (headline), MRR@10, Recall@100, Recall@1000; relevant = grade >= 1     (BEIR)
  dl       nDCG@10 (headline), MRR@10, Recall@1000; MRR and recall count grade >= 2     (TREC DL 2019/2020
           passage, as the track and Pyserini report them: trec_eval -l 2; nDCG uses the grades 0-3)
  msmarco  MRR@10 (headline), Recall@1000; relevant = grade >= 1                          (MS MARCO passage dev)

TREC DL qrels judge passages outside re-ranking pools (the shared 14k-passage pools), so a `dl` corpus need not hold
every judged passage; `beir` and `msmarco` corpora must (a missing judged passage is a wrong corpus).
`suite_for_name` picks a suite from a dataset's name: `dl19`, `dl20`, `trec-dl...` -> dl, `msmarco...` -> msmarco,
anything else -> beir.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Suite:
  name: str
  measures: tuple[str, ...]  # the first is the headline: the one averaged over datasets
  relevance_level: int  # trec_eval's -l: the lowest grade that counts as relevant for MRR and recall
  require_judged_docs: bool  # every judged doc id must be in the corpus

  @property
  def headline(self) -> str:
    return self.measures[0]


SUITES = {
    "beir": Suite("beir", ("ndcg@10", "mrr@10", "recall@100", "recall@1000"), 1, True),
    "dl": Suite("dl", ("ndcg@10", "mrr@10", "recall@1000"), 2, False),
    "msmarco": Suite("msmarco", ("mrr@10", "recall@1000"), 1, True),
}


def suite_for_name(name: str) -> Suite:
  lowered = name.lower()
  if re.match(r"(trec-?)?dl(\d|[-_.]|$)", lowered):
    return SUITES["dl"]
  if re.match(r"ms-?marco", lowered):
    return SUITES["msmarco"]
  return SUITES["beir"]
