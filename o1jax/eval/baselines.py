"""BM25 and sentence-encoder baselines on a BEIR split; `python -m o1jax.eval.baselines` prints them side by side.

  python -m o1jax.eval.baselines --dataset=../shared/data/beir-scifact --split=test [--out=DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from o1jax.data.readers import BeirDataset, load_beir
from o1jax.eval import embedding_cache, runner
from o1jax.eval.bm25 import BM25
from o1jax.eval.metrics import DEFAULT_MEASURES
from o1jax.eval.run_file import Run
from o1jax.eval.runner import doc_text
from o1jax.eval.st_encoder import SentenceEncoder


def bm25_run(dataset: BeirDataset, k: int = 1000) -> Run:
  doc_ids = list(dataset.corpus)
  index = BM25(doc_ids, [doc_text(dataset.corpus[d]) for d in doc_ids])
  query_ids = list(dataset.queries)
  ids, scores = index.search([dataset.queries[q] for q in query_ids], k)
  return {qid: {d: float(s) for d, s in zip(row, row_scores)} for qid, row, row_scores in zip(query_ids, ids, scores)}


def evaluate_bm25(dataset: BeirDataset, k: int = 1000, measures: Sequence[str] = DEFAULT_MEASURES
                  ) -> runner.Evaluation:
  return runner.evaluate_run(dataset, bm25_run(dataset, k), measures)


def cached_doc_encoder(encoder: SentenceEncoder, batch_size: int = 64,
                       cache_dir: str | None = None) -> runner.Encoder:
  """`encoder.encode` for corpora, cached on disk by model, texts and batch size (see embedding_cache)."""
  name = encoder.model_name_or_path
  settings = ("sentence-transformers", os.path.abspath(name) if os.path.exists(name) else name, str(batch_size))
  return lambda texts: embedding_cache.cached_encode(lambda t: encoder.encode(t, batch_size), texts, settings,
                                                     cache_dir)


def evaluate_sentence_encoder(dataset: BeirDataset, model_name_or_path: str | None = None, k: int = 1000,
                              search_backend: str = "auto", batch_size: int = 64,
                              cache_dir: str | None = None, measures: Sequence[str] = DEFAULT_MEASURES
                              ) -> runner.Evaluation:
  """A sentence-transformers model as a dense retriever (corpus embeddings cached on disk)."""
  encoder = SentenceEncoder(model_name_or_path)
  return runner.evaluate_dense(dataset, lambda texts: encoder.encode(texts, batch_size),
                               cached_doc_encoder(encoder, batch_size, cache_dir), k=k,
                               search_backend=search_backend, measures=measures)


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.eval.baselines", description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl[.gz], queries.jsonl, qrels/)")
  parser.add_argument("--split", default="test")
  parser.add_argument("--out", help="directory for run files and metrics JSON")
  parser.add_argument("--model", default=None, help="sentence-transformers model (default: offline all-MiniLM-L6-v2)")
  parser.add_argument("--search", default="auto", choices=["auto", "exact", "scann"])
  parser.add_argument("--k", type=int, default=1000)
  args = parser.parse_args(argv)
  dataset = load_beir(args.dataset, args.split)
  results = {"BM25": evaluate_bm25(dataset, args.k)}
  name = "MiniLM-L6-v2" if args.model is None else os.path.basename(args.model.rstrip("/"))
  results[name] = evaluate_sentence_encoder(dataset, args.model, args.k, args.search)
  if args.out:
    for label, evaluation in results.items():
      runner.write_evaluation(args.out, label, evaluation)
  print(runner.format_table({label: e.metrics for label, e in results.items()}))


if __name__ == "__main__":
  main(sys.argv[1:])
