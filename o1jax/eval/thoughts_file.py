"""The thoughts each query was embedded with, as a JSON-lines file next to its run file, to read what the model thought.

One line per query, in evaluation order:

  {"query_id": "1037798", "query": "who is robert gray", "thoughts": ["Robert Gray is ...", ...],
   "token_ids": [[4563, 7701, ...], ...]}

`thoughts[i]` is `token_ids[i]` decoded with its special tokens; the token ids are what was embedded (METHOD §2
appends generated ids, never re-tokenized text), so `Retriever.encode_with_thoughts(queries, token_ids)` reproduces
the run. Written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import os

from o1jax.files import atomic_write_text


@dataclasses.dataclass(frozen=True)
class QueryThoughts:
  query: str
  texts: list[str]
  token_ids: list[list[int]]


def write_thoughts(path: str | os.PathLike, thoughts: dict[str, QueryThoughts]) -> None:
  lines = [json.dumps({"query_id": qid, "query": t.query, "thoughts": t.texts, "token_ids": t.token_ids},
                      ensure_ascii=False) + "\n" for qid, t in thoughts.items()]
  atomic_write_text(path, "".join(lines))
