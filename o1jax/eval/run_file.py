"""TREC run files (`qid Q0 docid rank score tag`) and the run dict `{query id: {doc id: score}}` they hold."""
from __future__ import annotations

import gzip
import io
import os
from typing import Sequence

import numpy as np

from o1jax.data.readers import DataFormatError, read_lines
from o1jax.files import atomic_write_bytes

Run = dict[str, dict[str, float]]


def trec_order(docs: dict[str, float]) -> list[tuple[str, float]]:
  """Docs in trec_eval's ranking order: score descending, ties by doc id descending (it ignores the rank column)."""
  return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def cut_run(run: Run, k: int) -> Run:
  """The top `k` docs of every query, in trec_eval's order."""
  return {qid: dict(trec_order(docs)[:k]) for qid, docs in run.items()}


def run_from_search(query_ids: Sequence[str], doc_ids: Sequence[str], indices: np.ndarray,
                    scores: np.ndarray) -> Run:
  """A run from search results: `indices[i]` are corpus rows for `query_ids[i]`; negative rows mean no result."""
  if len(query_ids) != len(indices) or np.shape(indices) != np.shape(scores):
    raise ValueError(f"{len(query_ids)} query ids for indices {np.shape(indices)} and scores {np.shape(scores)}")
  run: Run = {}
  for qid, rows, row_scores in zip(query_ids, np.asarray(indices), np.asarray(scores)):
    run[qid] = {doc_ids[r]: float(s) for r, s in zip(rows, row_scores) if r >= 0}
  return run


def format_run(run: Run, tag: str) -> str:
  if not tag or any(c.isspace() for c in tag):
    raise ValueError(f"run tag must be one non-empty word, got {tag!r}")
  lines = []
  for qid, docs in run.items():
    for rank, (doc_id, score) in enumerate(trec_order(docs), start=1):
      lines.append(f"{qid} Q0 {doc_id} {rank} {score!r} {tag}\n")
  return "".join(lines)


def write_run(path: str | os.PathLike, run: Run, tag: str = "o1jax") -> None:
  """Writes a TREC run file atomically (gzip when the name ends with .gz); ranks follow trec_eval's order."""
  data = format_run(run, tag).encode("utf-8")
  if os.fspath(path).endswith(".gz"):
    buffer = io.BytesIO()
    # mtime=0: the same run gives the same bytes.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
      f.write(data)
    data = buffer.getvalue()
  atomic_write_bytes(path, data)


def read_run(path: str | os.PathLike, order: str = "score") -> Run:
  """Reads a TREC run file (.gz ok); a malformed line raises DataFormatError naming file, line and field.

  `order="rank"` replaces each score by -rank, so trec_eval ranks as the file's rank column does. Published runs
  often round their scores (RepLLaMA's DL19 run has 3 decimals and thousands of ties), which makes trec_eval break
  the ties by doc id instead of by the original order; the published numbers were computed in rank order.
  """
  if order not in ("score", "rank"):
    raise ValueError(f"order must be 'score' or 'rank', got {order!r}")
  run: Run = {}
  for number, line in read_lines(path):
    columns = line.split()
    if len(columns) != 6:
      raise DataFormatError(path, number, "columns", f"expected 6 columns (qid Q0 docid rank score tag), "
                            f"got {len(columns)}")
    qid, _, doc_id, rank, score, _ = columns
    try:
      rank_value = int(rank)
    except ValueError:
      raise DataFormatError(path, number, "rank", f"expected an integer, got {rank!r}") from None
    try:
      value = float(score)
    except ValueError:
      raise DataFormatError(path, number, "score", f"expected a number, got {score!r}") from None
    if not np.isfinite(value):
      raise DataFormatError(path, number, "score", f"not finite: {score!r}")
    docs = run.setdefault(qid, {})
    if doc_id in docs:
      raise DataFormatError(path, number, "docid", f"doc {doc_id!r} listed twice for query {qid!r}")
    docs[doc_id] = value if order == "score" else -float(rank_value)
  return run
