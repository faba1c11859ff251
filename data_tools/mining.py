"""Hard-negative mining with BM25 over the corpus (bm25s), the query's positives excluded."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from data_tools.inputs import TrainQuery
from o1jax.data.readers import Doc
from o1jax.templates import document_text


class BM25Miner:
  """Top-n BM25 documents per query that are not among its positives."""

  def __init__(self, corpus: Mapping[str, Doc]):
    from o1jax.retrieval.bm25 import BM25  # pylint: disable=g-import-not-at-top
    self.doc_ids = sorted(corpus)
    self.texts = {d: document_text(corpus[d].title, corpus[d].text) for d in self.doc_ids}
    self.index = BM25(self.doc_ids, [self.texts[d] for d in self.doc_ids])

  def mine(self, queries: Sequence[TrainQuery], n: int) -> dict[str, list[str]]:
    """Negative doc ids per query id, best first; fewer than n only when the corpus runs out."""
    if n <= 0 or not queries:
      return {q.query_id: [] for q in queries}
    depth = min(len(self.doc_ids), n + max(len(q.positive_ids) for q in queries))
    ranked, _ = self.index.search([q.query for q in queries], depth)
    out = {}
    for q, ids in zip(queries, ranked):
      positives = set(q.positive_ids)
      out[q.query_id] = [d for d in ids if d not in positives][:n]
    return out
