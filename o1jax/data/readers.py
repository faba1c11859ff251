"""Strict readers for the retrieval data formats o1jax trains and evaluates on.

BEIR directories (corpus/queries jsonl, qrels tsv), TREC topics and qrels, MS MARCO collection / queries /
triples (tsv), loose corpus + queries + qrels files (`load_files`, jsonl or tsv) and grouped jsonl
(`{query, pos: [...], neg: [...]}`). Every file may be gzipped (`.gz`). Malformed input raises
`DataFormatError` naming the file, the 1-based line and the field: a bad record is never dropped silently.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pathlib
import zlib
from typing import Any, Iterator, Sequence

PathLike = str | os.PathLike


class DataFormatError(ValueError):
  """A malformed record; the message names the file, the line (1-based) and the field."""

  def __init__(self, path: PathLike, line: int, field: str, problem: str):
    super().__init__(f"{path}, line {line}, field {field!r}: {problem}")
    self.path = str(path)
    self.line = line
    self.field = field


@dataclasses.dataclass(frozen=True)
class Doc:
  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class BeirDataset:
  corpus: dict[str, Doc]
  queries: dict[str, str]  # only the queries judged in the split's qrels, as BEIR evaluates them
  qrels: dict[str, dict[str, int]]


@dataclasses.dataclass(frozen=True)
class Triple:
  query: str
  pos: str
  neg: str


@dataclasses.dataclass(frozen=True)
class Group:
  query_id: str
  query: str
  pos: list[str]
  neg: list[str]
  extra: dict[str, Any]  # every other field of the record, untouched (e.g. pos_ids, grades)


def _open_binary(path: PathLike) -> io.BufferedIOBase:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_lines(path: PathLike) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its end-of-line) for every non-blank line.

  Lines are decoded one at a time so that bytes that are not UTF-8, or a damaged gzip stream, are reported
  with the line they are on.
  """
  with _open_binary(path) as f:
    number = 0
    while True:
      try:
        raw = f.readline()
      except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt .gz
        raise DataFormatError(path, number + 1, "<gzip>", f"unreadable compressed data ({e})") from None
      if not raw:
        return
      number += 1
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise DataFormatError(path, number, "<utf-8>",
                              f"not UTF-8 text (byte 0x{raw[e.start]:02x}, byte {e.start + 1} of the line)") from None
      if line.strip():
        yield number, line


def json_records(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  for number, line in read_lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFormatError(path, number, "<json>", f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataFormatError(path, number, "<json>", f"expected a JSON object, got {type(record).__name__}")
    yield number, record


def id_field(path: PathLike, number: int, record: dict[str, Any], field: str) -> str:
  if field not in record:
    raise DataFormatError(path, number, field, "missing")
  value = record[field]
  # Some BEIR exports write numeric ids; they are the same ids as their decimal strings.
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise DataFormatError(path, number, field, f"expected a string id, got {type(value).__name__}")
  value = str(value)
  if not value.strip():
    raise DataFormatError(path, number, field, "empty id")
  return value


def _text_field(path: PathLike, number: int, record: dict[str, Any], field: str, required: bool = True) -> str:
  if field not in record:
    if required:
      raise DataFormatError(path, number, field, "missing")
    return ""
  value = record[field]
  if value is None and not required:
    return ""
  if not isinstance(value, str):
    raise DataFormatError(path, number, field, f"expected a string, got {type(value).__name__}")
  if required and not value.strip():
    raise DataFormatError(path, number, field, "empty text")
  return value


def check_new(path: PathLike, number: int, field: str, key: str, seen: dict[str, int]) -> None:
  if key in seen:
    raise DataFormatError(path, number, field, f"duplicate id {key!r} (first on line {seen[key]})")
  seen[key] = number


def read_beir_corpus(path: PathLike) -> dict[str, Doc]:
  """BEIR `corpus.jsonl[.gz]`: `{"_id", "title" (optional), "text"}` per line."""
  corpus: dict[str, Doc] = {}
  seen: dict[str, int] = {}
  for number, record in json_records(path):
    doc_id = id_field(path, number, record, "_id")
    check_new(path, number, "_id", doc_id, seen)
    corpus[doc_id] = Doc(title=_text_field(path, number, record, "title", required=False),
                         text=_text_field(path, number, record, "text"))
  return corpus


def read_beir_queries(path: PathLike) -> dict[str, str]:
  """BEIR `queries.jsonl[.gz]`: `{"_id", "text", ...}` per line (other fields such as metadata are ignored)."""
  queries: dict[str, str] = {}
  seen: dict[str, int] = {}
  for number, record in json_records(path):
    query_id = id_field(path, number, record, "_id")
    check_new(path, number, "_id", query_id, seen)
    queries[query_id] = _text_field(path, number, record, "text")
  return queries


def qrels_rows(path: PathLike) -> Iterator[tuple[int, str, str, int]]:
  """(line, query id, doc id, grade) rows of a BEIR tsv (with header) or a TREC 4-column qrels file."""
  first = True
  for number, line in read_lines(path):
    if first and line.split("\t")[0].strip().lower() in ("query-id", "query_id", "qid"):
      first = False
      continue  # the BEIR header
    first = False
    columns = line.split("\t") if "\t" in line else line.split()
    if len(columns) == 3:
      query_id, doc_id, grade = columns
    elif len(columns) == 4:
      query_id, _, doc_id, grade = columns
    else:
      raise DataFormatError(path, number, "columns",
                            f"expected 3 (query-id corpus-id score) or 4 (qid iter docid rel) columns, "
                            f"got {len(columns)}")
    query_id, doc_id = query_id.strip(), doc_id.strip()
    if not query_id:
      raise DataFormatError(path, number, "query-id", "empty id")
    if not doc_id:
      raise DataFormatError(path, number, "corpus-id", "empty id")
    try:
      value = int(grade)
    except ValueError:
      raise DataFormatError(path, number, "score", f"expected an integer relevance grade, got {grade!r}") from None
    yield number, query_id, doc_id, value


def read_qrels(path: PathLike) -> dict[str, dict[str, int]]:
  """Relevance judgements `{query id: {doc id: grade}}`; a pair judged twice is an error."""
  qrels: dict[str, dict[str, int]] = {}
  seen: dict[tuple[str, str], int] = {}
  for number, query_id, doc_id, grade in qrels_rows(path):
    if (query_id, doc_id) in seen:
      raise DataFormatError(path, number, "corpus-id",
                            f"pair ({query_id!r}, {doc_id!r}) judged again (first on line {seen[query_id, doc_id]})")
    seen[query_id, doc_id] = number
    qrels.setdefault(query_id, {})[doc_id] = grade
  return qrels


def read_trec_topics(path: PathLike) -> dict[str, str]:
  """TREC / Anserini topics: `qid<TAB>text` per line."""
  topics: dict[str, str] = {}
  seen: dict[str, int] = {}
  for number, line in read_lines(path):
    query_id, tab, text = line.partition("\t")
    if not tab:
      raise DataFormatError(path, number, "columns", "expected 'qid<TAB>text'")
    query_id = query_id.strip()
    if not query_id:
      raise DataFormatError(path, number, "qid", "empty id")
    if not text.strip():
      raise DataFormatError(path, number, "text", "empty text")
    check_new(path, number, "qid", query_id, seen)
    topics[query_id] = text
  return topics


def read_tsv_corpus(path: PathLike) -> dict[str, Doc]:
  """MS MARCO `collection.tsv`: `pid<TAB>text`, or `pid<TAB>title<TAB>text`, per line."""
  corpus: dict[str, Doc] = {}
  seen: dict[str, int] = {}
  for number, line in read_lines(path):
    columns = line.split("\t")
    if len(columns) not in (2, 3):
      raise DataFormatError(path, number, "columns", f"expected 'pid<TAB>text' or 'pid<TAB>title<TAB>text', got "
                            f"{len(columns)} tab-separated columns")
    doc_id, text = columns[0].strip(), columns[-1]
    if not doc_id:
      raise DataFormatError(path, number, "pid", "empty id")
    if not text.strip():
      raise DataFormatError(path, number, "text", "empty text")
    check_new(path, number, "pid", doc_id, seen)
    corpus[doc_id] = Doc(title=columns[1] if len(columns) == 3 else "", text=text)
  return corpus


def _is_tsv(path: PathLike) -> bool:
  name = str(path).removesuffix(".gz")
  return name.endswith((".tsv", ".txt"))


def read_corpus(path: PathLike) -> dict[str, Doc]:
  """A corpus as BEIR jsonl or MS MARCO tsv, by its extension (`.tsv`/`.txt`, else jsonl; `.gz` either way)."""
  return read_tsv_corpus(path) if _is_tsv(path) else read_beir_corpus(path)


def read_queries(path: PathLike) -> dict[str, str]:
  """Queries as BEIR jsonl or `qid<TAB>text` tsv (MS MARCO queries.tsv, TREC topics), by extension."""
  return read_trec_topics(path) if _is_tsv(path) else read_beir_queries(path)


def find_file(directory: pathlib.Path, stem: str) -> pathlib.Path:
  """`directory/stem`, or its gzipped `stem.gz`."""
  for candidate in (directory / stem, directory / f"{stem}.gz"):
    if candidate.exists():
      return candidate
  raise FileNotFoundError(f"{directory}: neither {stem} nor {stem}.gz exists")


def load_beir(directory: PathLike, split: str, require_judged_docs: bool = True) -> BeirDataset:
  """A BEIR directory: `corpus.jsonl[.gz]`, `queries.jsonl[.gz]` and `qrels/<split>.tsv[.gz]`.

  Every qrels query id must be in the queries and (unless `require_judged_docs=False`, for re-ranking pools such
  as the TREC DL pools whose official qrels judge passages outside the pool) every qrels doc id in the corpus.
  The returned queries are the ones judged in the split.
  """
  return load_beir_splits(directory, [split], require_judged_docs)[split]


def load_beir_splits(directory: PathLike, splits: Sequence[str], require_judged_docs: bool = True
                     ) -> dict[str, BeirDataset]:
  """`load_beir` of several qrels splits of one directory, its corpus and queries read once and shared."""
  directory = pathlib.Path(directory)
  corpus_path, queries_path = find_file(directory, "corpus.jsonl"), find_file(directory, "queries.jsonl")
  qrels_paths = {split: find_file(directory / "qrels", f"{split}.tsv") for split in splits}
  corpus, all_queries = _corpus_and_queries(corpus_path, queries_path)
  return {split: _judged(corpus, corpus_path, all_queries, queries_path, path, require_judged_docs)
          for split, path in qrels_paths.items()}


def load_files(corpus_path: PathLike, queries_path: PathLike, qrels_path: PathLike,
               require_judged_docs: bool = True) -> BeirDataset:
  """A dataset from loose files: corpus and queries as jsonl or tsv (`read_corpus`, `read_queries`), qrels as
  BEIR tsv or TREC 4-column; checked as `load_beir` checks a directory."""
  corpus, all_queries = _corpus_and_queries(corpus_path, queries_path)
  return _judged(corpus, corpus_path, all_queries, queries_path, qrels_path, require_judged_docs)


def _corpus_and_queries(corpus_path: PathLike, queries_path: PathLike) -> tuple[dict[str, Doc], dict[str, str]]:
  corpus = read_corpus(corpus_path)
  if not corpus:
    raise DataFormatError(corpus_path, 1, "_id", "empty corpus")
  return corpus, read_queries(queries_path)


def _judged(corpus: dict[str, Doc], corpus_path: PathLike, all_queries: dict[str, str], queries_path: PathLike,
            qrels_path: PathLike, require_judged_docs: bool) -> BeirDataset:
  """The dataset of `qrels_path`'s judgements over a read corpus and queries, every judged id checked."""
  for number, query_id, doc_id, _ in qrels_rows(qrels_path):
    if query_id not in all_queries:
      raise DataFormatError(qrels_path, number, "query-id", f"query {query_id!r} is not in {queries_path}")
    if require_judged_docs and doc_id not in corpus:
      raise DataFormatError(qrels_path, number, "corpus-id", f"doc {doc_id!r} is not in {corpus_path}")
  qrels = read_qrels(qrels_path)
  if not qrels:
    raise DataFormatError(qrels_path, 1, "query-id", "no judgements")
  queries = {query_id: all_queries[query_id] for query_id in all_queries if query_id in qrels}
  return BeirDataset(corpus=corpus, queries=queries, qrels=qrels)


def read_triples(path: PathLike) -> Iterator[Triple]:
  """MS MARCO training triples: `query<TAB>positive<TAB>negative` per line."""
  for number, line in read_lines(path):
    columns = line.split("\t")
    if len(columns) != 3:
      raise DataFormatError(path, number, "columns", f"expected 3 tab-separated columns, got {len(columns)}")
    for field, value in zip(("query", "pos", "neg"), columns):
      if not value.strip():
        raise DataFormatError(path, number, field, "empty text")
    yield Triple(*columns)


def _text_list(path: PathLike, number: int, record: dict[str, Any], field: str, required: bool) -> list[str]:
  if field not in record:
    if required:
      raise DataFormatError(path, number, field, "missing")
    return []
  values = record[field]
  if not isinstance(values, list):
    raise DataFormatError(path, number, field, f"expected a list of strings, got {type(values).__name__}")
  for i, value in enumerate(values):
    if not isinstance(value, str) or not value.strip():
      raise DataFormatError(path, number, f"{field}[{i}]", "expected a non-empty string")
  if required and not values:
    raise DataFormatError(path, number, field, "no positives")
  return values


def read_grouped_jsonl(path: PathLike) -> Iterator[Group]:
  """Grouped training records `{"query_id" (optional), "query", "pos": [...], "neg": [...] (optional), ...}`.

  Without `query_id` the record's line number names the query (FlagEmbedding-style files carry no ids).
  """
  for number, record in json_records(path):
    query_id = id_field(path, number, record, "query_id") if "query_id" in record else str(number)
    extra = {k: v for k, v in record.items() if k not in ("query_id", "query", "pos", "neg")}
    yield Group(query_id=query_id, query=_text_field(path, number, record, "query"),
                pos=_text_list(path, number, record, "pos", required=True),
                neg=_text_list(path, number, record, "neg", required=False), extra=extra)
