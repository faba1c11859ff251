"""Training queries for synthesis: id, query, positive and negative passages, from BEIR or grouped jsonl."""
from __future__ import annotations

import dataclasses
import hashlib
import os

from o1jax.data import readers
from o1jax.templates import document_text


@dataclasses.dataclass(frozen=True)
class TrainQuery:
  query_id: str
  query: str
  positives: tuple[str, ...]
  negatives: tuple[str, ...] = ()  # empty when the dataset has none: mined later
  positive_ids: tuple[str, ...] = ()  # corpus ids, so mining can exclude them


def stable_hash(*parts: object) -> int:
  """64-bit hash that is the same in every process and Python version (unlike `hash`)."""
  digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little")


def from_beir(dataset: readers.BeirDataset) -> list[TrainQuery]:
  """One TrainQuery per judged query, positives = docs with relevance > 0, sorted by query id."""
  out = []
  for query_id in sorted(dataset.queries):
    positive_ids = tuple(sorted(d for d, rel in dataset.qrels.get(query_id, {}).items() if rel > 0))
    positives = tuple(document_text(dataset.corpus[d].title, dataset.corpus[d].text)
                      for d in positive_ids if d in dataset.corpus)
    out.append(TrainQuery(query_id, dataset.queries[query_id], positives, (), positive_ids))
  return out


def from_grouped_jsonl(path: str | os.PathLike) -> list[TrainQuery]:
  """Grouped records `{query_id?, query, pos, neg}` (read strictly), sorted by query id."""
  queries = [TrainQuery(g.query_id, g.query, tuple(g.pos), tuple(g.neg)) for g in readers.read_grouped_jsonl(path)]
  return sorted(queries, key=lambda q: q.query_id)


def check_query(q: TrainQuery) -> None:
  """Raises ValueError naming the query id when a record cannot be synthesized."""
  if not q.query.strip():
    raise ValueError(f"query {q.query_id!r}: empty query text")
  if not q.positives or not all(p.strip() for p in q.positives):
    raise ValueError(f"query {q.query_id!r}: no positive passage with text (ids {list(q.positive_ids)})")
