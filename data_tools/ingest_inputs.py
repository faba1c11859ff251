"""Training records to ingest, read leniently: every record of the input, good or bad, becomes an `Entry`.

Formats (every text file may be gzipped):
  reference  the O1 Embedder release: one JSON object per line (`.jsonl`, `.json`) with `query`, `pos`, and
             optionally `query_id`, `neg`, `pos_ids`, `neg_ids`, `thought`, `all_thought`, `model2scores`,
             `pos_scores`, `neg_scores`, `type`; or the same records as Hugging Face `datasets` writes them
             (`to_json`: null for a field a record lacks; `to_parquet`: `.parquet`, row n counts as line n).
  msmarco    `collection` (pid<TAB>text) and `queries` (qid<TAB>text), `qrels` (TREC 4-column or BEIR tsv),
             `triples`: `qid<TAB>pos_pid<TAB>neg_pid` when a collection and queries are given, else
             `query<TAB>pos<TAB>neg` text.
  beir       a BEIR directory's corpus, queries and `qrels/<split>.tsv`, as msmarco's collection/queries/qrels.

Query ids: the record's `query_id`, else its line number (`<file name>:<line>` when there are several inputs).
Judged queries (qrels) are records in query-id order: positives are the passages graded > 0, negatives those
graded <= 0, both in passage-id order; triples add their passages to their query's record (ids triples by qid, text
triples by query text, whose id is the line of its first triple), in file order; a passage is never both.
`all_thought` candidates that are empty or null are dropped with their `model2scores` columns; members (sorted by
name) with null scores are dropped (Parquet stores a member a record lacks as null).

A bad record is an `Entry` whose `error` (`readers.DataFormatError`) names its file, line and field; only a file
that cannot be read at all (missing, not UTF-8, corrupt gzip, a malformed collection, queries or qrels line) raises.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import collections
import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from data_tools.inputs import TrainQuery
from o1jax.data import readers
from o1jax.templates import document_text

REFERENCE_FIELDS = ("query_id", "query", "pos", "neg", "pos_ids", "neg_ids", "thought", "all_thought", "model2scores",
                    "pos_scores", "neg_scores", "type")


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
  query_id: str
  path: str
  line: int
  query: str = ""
  positives: tuple[str, ...] = ()
  negatives: tuple[str, ...] = ()
  positive_ids: tuple[str, ...] = ()
  negative_ids: tuple[str, ...] = ()
  thought: str = ""  # the data's chosen thought; "" when it has none
  candidates: tuple[str, ...] = ()  # all_thought, empty ones dropped
  members: tuple[str, ...] = ()  # model2scores' committee, sorted by name
  scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [members, cands]
  positive_scores: np.ndarray | None = None  # teacher scores, None when the record has none
  negative_scores: np.ndarray | None = None
  task_type: str = ""
  error: readers.DataFormatError | None = None

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"

  def train_query(self) -> TrainQuery:
    return TrainQuery(self.query_id, self.query, self.positives, self.negatives, self.positive_ids)


@dataclasses.dataclass(frozen=True)
class Loaded:
  entries: list[Entry]
  corpus: dict[str, readers.Doc] | None  # MS MARCO collection or BEIR corpus: what negatives are mined from
  ignored_fields: dict[str, int]  # reference fields ingest does not know: how many records carry each


# --- reference records


def _present(record: dict[str, Any], field: str) -> Any:
  """The field's value, None when it is missing or null."""
  return record.get(field)


def _text(path: str, number: int, record: dict[str, Any], field: str, required: bool) -> str:
  value = _present(record, field)
  if value is None:
    if required:
      raise readers.DataFormatError(path, number, field, "missing")
    return ""
  if not isinstance(value, str):
    raise readers.DataFormatError(path, number, field, f"expected a string, got {type(value).__name__}")
  if required and not value.strip():
    raise readers.DataFormatError(path, number, field, "empty text")
  return value


def _list(path: str, number: int, record: dict[str, Any], field: str) -> list[Any] | None:
  value = _present(record, field)
  if value is not None and not isinstance(value, list):
    raise readers.DataFormatError(path, number, field, f"expected a list, got {type(value).__name__}")
  return value


def _passages(path: str, number: int, record: dict[str, Any], field: str, required: bool) -> tuple[str, ...]:
  values = _list(path, number, record, field) or []
  for i, value in enumerate(values):
    if not isinstance(value, str) or not value.strip():
      raise readers.DataFormatError(path, number, f"{field}[{i}]", "expected a non-empty string")
  if required and not values:
    raise readers.DataFormatError(path, number, field, "no positive passage")
  return tuple(values)


def _ids(path: str, number: int, record: dict[str, Any], field: str, count: int) -> tuple[str, ...]:
  values = _list(path, number, record, field)
  if values is None:
    return ()
  if len(values) != count:
    raise readers.DataFormatError(path, number, field, f"{len(values)} ids for {count} passages")
  for i, value in enumerate(values):
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
      raise readers.DataFormatError(path, number, f"{field}[{i}]", f"expected a non-empty id, got {value!r}")
  return tuple(map(str, values))


def _numbers(path: str, number: int, field: str, values: Any, count: int, what: str) -> np.ndarray:
  if not isinstance(values, list):
    raise readers.DataFormatError(path, number, field, f"expected a list of numbers, got {type(values).__name__}")
  if len(values) != count:
    raise readers.DataFormatError(path, number, field, f"{len(values)} scores for {count} {what}")
  for i, value in enumerate(values):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise readers.DataFormatError(path, number, f"{field}[{i}]", f"expected a finite number, got {value!r}")
  return np.asarray(values, np.float32).reshape(count)


def _teacher_scores(path: str, number: int, record: dict[str, Any], positives: tuple[str, ...],
                    negatives: tuple[str, ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
  pos, neg = _present(record, "pos_scores"), _present(record, "neg_scores")
  if pos is None and neg is None:
    return None, None
  if neg is None and negatives:
    raise readers.DataFormatError(path, number, "neg_scores", "missing: pos_scores and neg_scores come together")
  if pos is None:
    raise readers.DataFormatError(path, number, "pos_scores", "missing: pos_scores and neg_scores come together")
  return (_numbers(path, number, "pos_scores", pos, len(positives), "passages"),
          _numbers(path, number, "neg_scores", [] if neg is None else neg, len(negatives), "passages"))


def _committee(path: str, number: int, record: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
  """(non-empty candidates, member names, [members, candidates] scores) of all_thought and model2scores."""
  thoughts = _list(path, number, record, "all_thought") or []
  for i, thought in enumerate(thoughts):
    if thought is not None and not isinstance(thought, str):
      raise readers.DataFormatError(path, number, f"all_thought[{i}]", f"expected a string, got {thought!r}")
  table = _present(record, "model2scores")
  if table is not None and not isinstance(table, dict):
    raise readers.DataFormatError(path, number, "model2scores", f"expected an object, got {type(table).__name__}")
  table = {name: values for name, values in (table or {}).items() if values is not None}
  if table and not thoughts:
    raise readers.DataFormatError(path, number, "model2scores", "committee scores without all_thought candidates")
  keep = [i for i, thought in enumerate(thoughts) if thought and thought.strip()]
  members = tuple(sorted(table))
  rows = [_numbers(path, number, f"model2scores[{name!r}]", table[name], len(thoughts), "all_thought candidates")
          for name in members]
  scores = np.stack(rows)[:, keep] if rows else np.zeros((0, len(keep)), np.float32)
  return tuple(thoughts[i] for i in keep), members, scores


def _query_id(path: str, number: int, record: dict[str, Any], default: str) -> str:
  value = _present(record, "query_id")
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
    raise readers.DataFormatError(path, number, "query_id", f"expected a non-empty id, got {value!r}")
  return str(value)


def reference_entry(path: str, number: int, record: Any, default_id: str) -> Entry:
  """One reference record; a bad one is an Entry with its error."""
  try:
    if not isinstance(record, dict):
      raise readers.DataFormatError(path, number, "<json>", f"expected a JSON object, got {type(record).__name__}")
    query_id = _query_id(path, number, record, default_id)
  except readers.DataFormatError as e:
    return Entry(default_id, path, number, error=e)
  try:
    positives = _passages(path, number, record, "pos", required=True)
    negatives = _passages(path, number, record, "neg", required=False)
    candidates, members, scores = _committee(path, number, record)
    thought = _text(path, number, record, "thought", required=False)
    positive_scores, negative_scores = _teacher_scores(path, number, record, positives, negatives)
    return Entry(
        query_id, path, number, query=_text(path, number, record, "query", required=True), positives=positives,
        negatives=negatives, positive_ids=_ids(path, number, record, "pos_ids", len(positives)),
        negative_ids=_ids(path, number, record, "neg_ids", len(negatives)),
        thought=thought if thought.strip() else "",
        candidates=candidates, members=members, scores=scores, positive_scores=positive_scores,
        negative_scores=negative_scores, task_type=_text(path, number, record, "type", required=False))
  except readers.DataFormatError as e:
    return Entry(query_id, path, number, error=e)


def _json_lines(path: str) -> Iterator[tuple[int, Any]]:
  for number, line in readers.read_lines(path):
    try:
      yield number, json.loads(line)
    except json.JSONDecodeError as e:
      yield number, readers.DataFormatError(path, number, "<json>", f"malformed JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
  import pyarrow  # pylint: disable=g-import-not-at-top (only for Parquet input)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    rows = pq.ParquetFile(path).iter_batches(batch_size=1024)
    number = 0
    for batch in rows:
      for row in batch.to_pylist():
        number += 1
        yield number, row
  except (pyarrow.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable Parquet file ({e})") from None


def read_reference(paths: Sequence[str], limit: int | None) -> Loaded:
  """The first `limit` records (all when None) of the reference files, in order."""
  entries: list[Entry] = []
  seen: dict[str, str] = {}
  ignored: collections.Counter[str] = collections.Counter()
  for path in paths:
    rows = _parquet_rows(path) if path.endswith(".parquet") else _json_lines(path)
    prefix = f"{pathlib.Path(path).name}:" if len(paths) > 1 else ""
    for number, record in rows:
      if limit is not None and len(entries) >= limit:
        break
      if isinstance(record, readers.DataFormatError):
        entries.append(Entry(f"{prefix}{number}", path, number, error=record))
        continue
      entry = reference_entry(path, number, record, f"{prefix}{number}")
      if isinstance(record, dict):
        ignored.update(k for k, v in record.items() if k not in REFERENCE_FIELDS and v is not None)
      if entry.error is None and entry.query_id in seen:
        entry = dataclasses.replace(entry, error=readers.DataFormatError(
            path, number, "query_id", f"{entry.query_id!r} again (first at {seen[entry.query_id]})"))
      seen.setdefault(entry.query_id, entry.where)
      entries.append(entry)
  return Loaded(entries, None, dict(ignored))


# --- judged queries and triples (MS MARCO, BEIR)


@dataclasses.dataclass
class _Group:
  query_id: str
  query: str
  path: str
  line: int
  positives: dict[str, str] = dataclasses.field(default_factory=dict)  # key (id or text) -> text, in order
  negatives: dict[str, str] = dataclasses.field(default_factory=dict)

  def entry(self, with_ids: bool) -> Entry:
    negatives = {k: v for k, v in self.negatives.items() if k not in self.positives}
    return Entry(self.query_id, self.path, self.line, query=self.query, positives=tuple(self.positives.values()),
                 negatives=tuple(negatives.values()), positive_ids=tuple(self.positives) if with_ids else (),
                 negative_ids=tuple(negatives) if with_ids else ())


def _passage(corpus: dict[str, readers.Doc], pid: str) -> str:
  return document_text(corpus[pid].title, corpus[pid].text)


def _judgement_lines(path: str) -> dict[tuple[str, str], int]:
  """The first line of each (query id, passage id) of a qrels file."""
  lines: dict[tuple[str, str], int] = {}
  for number, query_id, doc_id, _ in readers.qrels_rows(path):
    lines.setdefault((query_id, doc_id), number)
  return lines


def _qrels_groups(qrels_path: str, corpus: dict[str, readers.Doc], topics: dict[str, str], corpus_path: str,
                  queries_path: str) -> tuple[dict[str, _Group], list[Entry]]:
  qrels, lines = readers.read_qrels(qrels_path), _judgement_lines(qrels_path)
  groups, bad = {}, []
  for query_id in sorted(qrels):
    judged = sorted(qrels[query_id].items())
    first = min(lines[query_id, pid] for pid, _ in judged)
    problem = None
    if query_id not in topics:
      problem = ("query-id", f"query {query_id!r} is not in {queries_path}")
    elif missing := [pid for pid, _ in judged if pid not in corpus]:
      first = lines[query_id, missing[0]]
      problem = ("corpus-id", f"passage {missing[0]!r} is not in {corpus_path}")
    elif not any(grade > 0 for _, grade in judged):
      problem = ("score", f"query {query_id!r} has no passage graded > 0")
    if problem:
      bad.append(Entry(query_id, qrels_path, first, error=readers.DataFormatError(qrels_path, first, *problem)))
      continue
    group = groups[query_id] = _Group(query_id, topics[query_id], qrels_path, first)
    for pid, grade in judged:
      (group.positives if grade > 0 else group.negatives)[pid] = _passage(corpus, pid)
  return groups, bad


def _triples(path: str, corpus: dict[str, readers.Doc] | None, topics: dict[str, str] | None,
             groups: dict[str, _Group]) -> list[Entry | _Group]:
  """Adds each triple to its query's group; returns the new groups and the bad lines, in file order."""
  out: list[Entry | _Group] = []
  fields = ("qid", "pos_pid", "neg_pid") if topics is not None else ("query", "pos", "neg")
  for number, line in readers.read_lines(path):
    columns = line.split("\t")
    try:
      if len(columns) != 3:
        raise readers.DataFormatError(path, number, "columns", f"expected 3 tab-separated columns, got {len(columns)}")
      for field, value in zip(fields, columns):
        if not value.strip():
          raise readers.DataFormatError(path, number, field, "empty")
      if topics is not None:
        key, pos, neg = (c.strip() for c in columns)
        if key not in topics:
          raise readers.DataFormatError(path, number, "qid", f"query {key!r} is not in the queries")
        for field, pid in (("pos_pid", pos), ("neg_pid", neg)):
          if pid not in corpus:
            raise readers.DataFormatError(path, number, field, f"passage {pid!r} is not in the collection")
    except readers.DataFormatError as e:
      out.append(Entry(str(number), path, number, error=e))
      continue
    if topics is not None:
      group = groups.get(key) or _Group(key, topics[key], path, number)
      pos_text, neg_text = _passage(corpus, pos), _passage(corpus, neg)
    else:
      query, pos, neg = columns
      group = groups.get(query) or _Group(str(number), query, path, number)
      key, pos_text, neg_text = query, pos, neg
    if key not in groups:
      groups[key] = group
      out.append(group)
    group.positives.setdefault(pos, pos_text)
    group.negatives.setdefault(neg, neg_text)
  return out


def read_judged(corpus_path: str | None, queries_path: str | None, qrels_path: str | None, triples_path: str | None,
                limit: int | None) -> Loaded:
  """Records of judged queries and/or triples (module docstring); the first `limit` when given."""
  corpus = readers.read_corpus(corpus_path) if corpus_path else None
  topics = readers.read_queries(queries_path) if queries_path else None
  groups, entries = {}, []
  if qrels_path:
    groups, entries = _qrels_groups(qrels_path, corpus, topics, corpus_path, queries_path)
  ordered: list[Entry | _Group] = [*entries, *groups.values()]
  ordered.sort(key=lambda g: g.query_id)
  if triples_path:
    ordered += _triples(triples_path, corpus, topics, groups)
  with_ids = topics is not None
  entries = [g.entry(with_ids) if isinstance(g, _Group) else g for g in ordered]
  return Loaded(entries[:limit] if limit is not None else entries, corpus, {})


def read_beir(directory: str, split: str, limit: int | None) -> Loaded:
  """The judged queries of a BEIR directory's split."""
  root = pathlib.Path(directory)
  return read_judged(str(readers.find_file(root, "corpus.jsonl")), str(readers.find_file(root, "queries.jsonl")),
                     str(readers.find_file(root / "qrels", f"{split}.tsv")), None, limit)
