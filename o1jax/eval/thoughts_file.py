"""The thoughts each query was embedded with, as a JSON-lines file next to its run file, to read what the model thought
and to embed queries with thoughts written elsewhere (`python -m o1jax.eval --thoughts_from=NAME=FILE`).

One line per query, in evaluation order:

  {"query_id": "1037798", "query": "who is robert gray", "thoughts": ["Robert Gray is ...", ...],
   "token_ids": [[4563, 7701, ...], ...]}

`thoughts[i]` is `token_ids[i]` decoded with its special tokens; the token ids are what was embedded (METHOD §2
appends generated ids, never re-tokenized text), so `Retriever.encode_with_thoughts(queries, token_ids)` reproduces
the run. Written atomically. A file read back needs `query_id` and a non-empty list `thoughts` (an empty string is
the thought-dropped form); `query` and `token_ids` are optional (thoughts written by another program carry text
only).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import json
import os
import re

from o1jax import storage
from o1jax.data.readers import DataFormatError, check_new, id_field, json_records
from o1jax.files import atomic_write_text


@dataclasses.dataclass(frozen=True)
class QueryThoughts:
  query: str
  texts: list[str]
  token_ids: list[list[int]] | None = None  # None: text only, to be tokenized by whoever embeds it


def write_thoughts(path: str | os.PathLike, thoughts: dict[str, QueryThoughts]) -> None:
  lines = []
  for qid, t in thoughts.items():
    record = {"query_id": qid, "query": t.query, "thoughts": t.texts}
    if t.token_ids is not None:
      record["token_ids"] = t.token_ids
    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  atomic_write_text(path, "".join(lines))


def _thought_texts(path: str | os.PathLike, number: int, record: dict) -> list[str]:
  texts = record.get("thoughts")
  if not isinstance(texts, list) or not texts:
    raise DataFormatError(path, number, "thoughts", "expected a non-empty list of strings")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise DataFormatError(path, number, f"thoughts[{i}]", f"expected a string, got {type(text).__name__}")
  return texts


def _token_ids(path: str | os.PathLike, number: int, record: dict, count: int) -> list[list[int]] | None:
  if "token_ids" not in record:
    return None
  ids = record["token_ids"]
  if not isinstance(ids, list) or len(ids) != count:
    raise DataFormatError(path, number, "token_ids", f"expected one list of token ids per thought ({count})")
  for i, row in enumerate(ids):
    if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in row):
      raise DataFormatError(path, number, f"token_ids[{i}]", "expected a list of non-negative integers")
  return ids


def read_thoughts(path: str | os.PathLike) -> dict[str, QueryThoughts]:
  """{query id: its thoughts} of a thoughts file, every line checked (DataFormatError names file, line, field)."""
  out: dict[str, QueryThoughts] = {}
  seen: dict[str, int] = {}
  for number, record in json_records(path):
    qid = id_field(path, number, record, "query_id")
    check_new(path, number, "query_id", qid, seen)
    query = record.get("query", "")
    if not isinstance(query, str):
      raise DataFormatError(path, number, "query", f"expected a string, got {type(query).__name__}")
    texts = _thought_texts(path, number, record)
    out[qid] = QueryThoughts(query, texts, _token_ids(path, number, record, len(texts)))
  if not out:
    raise DataFormatError(path, 1, "query_id", "no thoughts in the file")
  return out


def named_files(option: str, values: Iterable[str], reserved: Sequence[str] = ()) -> dict[str, str]:
  """{NAME: FILE} of a repeatable `--option=NAME=FILE`: each NAME of letters, digits, '.', '_' or '-', given once
  and not one of `reserved`; each FILE present (read later). A ValueError quotes the option and its value."""
  files: dict[str, str] = {}
  for value in values:
    name, sep, path = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not path:
      raise ValueError(f"{option}={value}: expected NAME=FILE, NAME of letters, digits, '.', '_' or '-'")
    if name in files or name in reserved:
      raise ValueError(f"{option}={value}: the name {name!r} is "
                       + ("given twice" if name in files else f"taken ({', '.join(reserved)})"))
    if not storage.is_file(path):
      raise ValueError(f"{option}={value}: no such file")
    files[name] = path
  return files


def check_covers(source: str, query_ids: Sequence[str], thoughts: dict[str, QueryThoughts]) -> None:
  """A ValueError naming `source` unless `thoughts` has every query of `query_ids`."""
  missing = [q for q in query_ids if q not in thoughts]
  if missing:
    raise ValueError(f"{source}: no thoughts for {len(missing)} of the {len(query_ids)} queries "
                     f"(first: {missing[0]!r})")
