"""BM25 through bm25s: English stopwords and Snowball stemming (PyStemmer), Lucene's scoring variant."""
from __future__ import annotations

import logging
from typing import Sequence

import bm25s
import numpy as np
import Stemmer
from bm25s.tokenization import Tokenizer


# bm25s sets its own logger to DEBUG and logs every index build: the committee builds one per query.
logging.getLogger("bm25s").setLevel(logging.WARNING)


def _tokenizer() -> Tokenizer:
  return Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english").stemWord)


class BM25:
  """A BM25 index over `texts`; `search` returns doc ids and scores, best first.

  k1=0.9, b=0.4 are Anserini's BEIR settings (Kamphuis et al. 2020 use the same Lucene variant).
  """

  def __init__(self, doc_ids: Sequence[str], texts: Sequence[str], k1: float = 0.9, b: float = 0.4):
    if len(doc_ids) != len(texts):
      raise ValueError(f"{len(doc_ids)} doc ids for {len(texts)} texts")
    if not texts:
      raise ValueError("empty corpus: nothing to index")
    self.doc_ids = list(doc_ids)
    self._tokenizer = _tokenizer()
    corpus_tokens = self._tokenizer.tokenize(list(texts), update_vocab=True, return_as="ids", show_progress=False)
    self._index = bm25s.BM25(k1=k1, b=b, method="lucene")
    self._index.index(corpus_tokens, show_progress=False)

  def _query_tokens(self, queries: Sequence[str]) -> list[list[int]]:
    for i, query in enumerate(queries):
      if not query.strip():
        raise ValueError(f"query {i} is empty")
    # Words absent from the corpus map to the empty-token id, which no document contains (score 0).
    return self._tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)

  def scores(self, query: str) -> np.ndarray:
    """The score of every doc for one query, in corpus order."""
    return np.asarray(self._index.get_scores(self._query_tokens([query])[0]), np.float32)

  def search(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]:
    """Top-k doc ids per query (k is capped at the corpus size) and their float32 scores [Q, k]."""
    k = min(k, len(self.doc_ids))
    rows, scores = self._index.retrieve(self._query_tokens(queries), k=k, show_progress=False, n_threads=1)
    ids = [[self.doc_ids[r] for r in row] for row in rows]
    return ids, np.asarray(scores, np.float32)


def bm25_scores(query: str, docs: Sequence[str], k1: float = 0.9, b: float = 0.4) -> np.ndarray:
  """The BM25 score of every doc in `docs` for `query` (docs are the whole collection: idf comes from them)."""
  return BM25([str(i) for i in range(len(docs))], docs, k1=k1, b=b).scores(query)
