"""Evaluate any encoder on a BEIR split: embed, search, score; write the run, metrics JSON, thoughts and a table.

Encoders plug in as plain callables: `evaluate_dense` takes `encode_queries(list[str])` and
`encode_docs(list[str])` returning [N, D] float32 arrays, so thinking, pooling and caching stay with the caller.
The o1jax `Retriever` searches by itself; `retriever_eval` scores its runs with `evaluate_run`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import Callable, Sequence

import numpy as np

from o1jax import storage
from o1jax.data.readers import BeirDataset
from o1jax.eval import metrics, run_file, thoughts_file
from o1jax.files import atomic_write_json
from o1jax.retrieval import search
from o1jax.templates import document_text

Encoder = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Evaluation:
  run: run_file.Run
  metrics: dict[str, float]
  per_query: dict[str, dict[str, float]]  # {measure: {query id: value}}
  relevance_level: int = 1  # trec_eval's -l for the binary measures
  thoughts: dict[str, thoughts_file.QueryThoughts] | None = None  # {query id: its thoughts}, systems that think


def evaluate_run(dataset: BeirDataset, run: run_file.Run, measures: Sequence[str] = metrics.DEFAULT_MEASURES,
                 relevance_level: int = 1) -> Evaluation:
  per_query = metrics.evaluate_per_query(dataset.qrels, run, measures, relevance_level)
  means = {m: float(np.mean(list(values.values()))) for m, values in per_query.items()}
  return Evaluation(run=run, metrics=means, per_query=per_query, relevance_level=relevance_level)


def _embed(encode: Encoder, texts: list[str], what: str) -> np.ndarray:
  embeddings = np.asarray(encode(texts), np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
    raise ValueError(f"encode_{what} returned shape {embeddings.shape} for {len(texts)} texts")
  return embeddings


def evaluate_dense(dataset: BeirDataset, encode_queries: Encoder, encode_docs: Encoder, k: int = 1000,
                   search_backend: str = "auto", remove_self_hits: bool = False,
                   measures: Sequence[str] = metrics.DEFAULT_MEASURES) -> Evaluation:
  """Inner-product retrieval of the top `k` docs per query; `remove_self_hits` for ArguAna / Quora."""
  if not dataset.corpus:
    raise ValueError("empty corpus")
  doc_ids = list(dataset.corpus)
  doc_embeddings = _embed(encode_docs, [document_text(dataset.corpus[d].title, dataset.corpus[d].text)
                                        for d in doc_ids], "docs")
  query_ids = list(dataset.queries)
  query_embeddings = _embed(encode_queries, [dataset.queries[q] for q in query_ids], "queries")
  if query_embeddings.shape[1] != doc_embeddings.shape[1]:
    raise ValueError(f"query dim {query_embeddings.shape[1]} != doc dim {doc_embeddings.shape[1]}")
  searcher = search.build_searcher(doc_embeddings, search_backend, k)
  if remove_self_hits:
    indices, scores = search.search_without_self_hits(searcher, query_embeddings, k, query_ids, doc_ids)
  else:
    indices, scores = searcher.search(query_embeddings, k)
  return evaluate_run(dataset, run_file.run_from_search(query_ids, doc_ids, indices, scores), measures)


def check_output_directory(option: str, path: str) -> None:
  """Creates `path` if needed and proves a file can be written there, before any work whose results go there
  (permission bits prove nothing for root). Raises ValueError naming `option`. An object store (`gs://...`)
  has no directories to create: there the first upload says whether it can be written."""
  if storage.is_remote(path):
    if storage.is_file(path):
      raise ValueError(f"{option}={path}: exists and is not a directory")
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{option}={path}: exists and is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ValueError(f"{option}={path}: cannot write there ({e.strerror or e})") from None


def write_evaluation(out_dir: str | os.PathLike, name: str, evaluation: Evaluation) -> str:
  """`<name>.trec` (TREC run), `<name>.metrics.json` (means and per-query values) and, for a system that thinks,
  `<name>.thoughts.jsonl` (see thoughts_file) in `out_dir`."""
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
  run_file.write_run(storage.join(out_dir, f"{slug}.trec"), evaluation.run, tag=slug)
  if evaluation.thoughts is not None:
    thoughts_file.write_thoughts(storage.join(out_dir, f"{slug}.thoughts.jsonl"), evaluation.thoughts)
  payload = {"name": name, "metrics": evaluation.metrics, "per_query": evaluation.per_query,
             "relevance_level": evaluation.relevance_level}
  metrics_path = storage.join(out_dir, f"{slug}.metrics.json")
  atomic_write_json(metrics_path, payload)
  return metrics_path


def format_table(rows: dict[str, dict[str, float]]) -> str:
  """A fixed-width table: one row per system, one column per measure (in first-seen order), 4 decimals.

  Columns named `group/measure` (a dataset's measures) get a first header line with each group's name over its
  columns."""
  columns: list[str] = []
  for values in rows.values():
    columns += [m for m in values if m not in columns]
  name_width = max([len("system")] + [len(name) for name in rows])
  groups = [c.rpartition("/")[0] for c in columns]
  widths = [max(len(c.rpartition("/")[2]), 6) for c in columns]
  spans: list[list] = []  # [group, first column, end column] of each run of columns in one group
  for i, group in enumerate(groups):
    if spans and spans[-1][0] == group:
      spans[-1][2] = i + 1
    else:
      spans.append([group, i, i + 1])
  for group, start, end in spans:  # widen a group's last column until its name fits over the group
    widths[end - 1] += max(0, len(group) - (sum(widths[start:end]) + 2 * (end - start - 1)))
  lines = []
  if any(groups):
    lines.append("  ".join([" " * name_width] + [f"{group:<{sum(widths[start:end]) + 2 * (end - start - 1)}}"
                                                 for group, start, end in spans]).rstrip())
  lines.append("  ".join([f"{'system':<{name_width}}"] +
                         [f"{c.rpartition('/')[2]:>{w}}" for c, w in zip(columns, widths)]))
  lines.append("  ".join(["-" * name_width] + ["-" * w for w in widths]))
  for name, values in rows.items():
    cells = [f"{values[c]:>{w}.4f}" if c in values else f"{'-':>{w}}" for c, w in zip(columns, widths)]
    lines.append("  ".join([f"{name:<{name_width}}"] + cells))
  return "\n".join(lines)
