"""Retrieval benchmark: ScaNN vs exact search (QPS, recall@k), corpus encoding docs/s and query latency.

  python -m o1jax.bench eval [--dataset=DIR] [--synthetic_docs=100000] [--queries=1000] [--k=100]
      [--checkpoint=PATH [--latency_queries=20] [--think=3] [--max_new_tokens=128] [--dtype=float32]] [--json=PATH]

With --checkpoint (an exported HF directory or an o1jax checkpoint), the o1jax model's SciFact corpus encoding
rate (first pass with compilation, then steady) and the latency of one query at a time, p50/p95, with and
without thinking, next to MiniLM's encoding rate measured in the same run.

SciFact runs when --dataset or $O1JAX_SHARED points at it; the synthetic corpus is clustered (Gaussian blobs on
the unit sphere, like real embeddings), since uniform noise has no structure for partitioning to exploit. `--json=PATH`
writes the search comparisons (QPS, recall, build time; each the best of 3 after a warm-up) with the machine record.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np

from o1jax.bench import protocol
from o1jax.model.config import COMPUTE_DTYPES
from o1jax.retrieval import search


def clustered_corpus(num_docs: int, num_queries: int, dim: int, clusters: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((clusters, dim)).astype(np.float32)

  def sample(n: int) -> np.ndarray:
    points = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)

  return sample(num_docs), sample(num_queries)


def _best_time(fn: Callable[[], object], repeats: int = 3) -> float:
  fn()  # warm-up: compile (JAX) and touch memory
  return min(_timed(fn) for _ in range(repeats))


def _timed(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def compare(name: str, docs: np.ndarray, queries: np.ndarray, k: int,
            config: search.ScannConfig | None = None) -> dict[str, float]:
  exact = search.ExactSearch(docs)
  exact_indices, _ = exact.search(queries, k)
  exact_s = _best_time(lambda: exact.search(queries, k))
  start = time.perf_counter()
  scann = search.ScannSearch(docs, k=k, config=config)
  build_s = time.perf_counter() - start
  scann_indices, _ = scann.search(queries, k)
  scann_s = _best_time(lambda: scann.search(queries, k))
  result = {"exact_qps": len(queries) / exact_s, "scann_qps": len(queries) / scann_s,
            "recall": search.recall_at_k(scann_indices, exact_indices, k), "build_s": build_s,
            "docs": int(docs.shape[0]), "dim": int(docs.shape[1]), "queries": len(queries)}
  print(f"{name}: {docs.shape[0]:,} docs x {docs.shape[1]}, {len(queries)} queries, {scann.config}")
  print(f"  exact {result['exact_qps']:,.0f} QPS | ScaNN {result['scann_qps']:,.0f} QPS "
        f"(build {build_s:.1f}s) | ratio {result['scann_qps'] / result['exact_qps']:.1f}x | "
        f"recall@{k} {result['recall']:.4f}")
  return result


def o1jax_speed(checkpoint: str, texts: list[str], queries: list[str], think: int, max_new_tokens: int,
                dtype: str = "float32") -> None:
  from o1jax.retrieval.retriever import Retriever, Sampling
  retriever = Retriever.from_pretrained(checkpoint, dtype=dtype, fingerprint=None)  # no cache: time the model
  first_s = _timed(lambda: retriever.encode_docs(texts))
  steady_s = _timed(lambda: retriever.encode_docs(texts))
  print(f"o1jax corpus encoding ({checkpoint}, {dtype}, {retriever.embedder.shards} devices): "
        f"{len(texts) / steady_s:.1f} docs/s steady, {len(texts) / first_s:.1f} docs/s first pass with compilation "
        f"({len(texts)} SciFact docs)")
  sampling = Sampling(max_new_tokens=max_new_tokens)
  for k in (0, think):
    for q in queries:  # warm-up: compile every length bucket these queries land in
      retriever.encode_queries([q], k, sampling)
    times = np.array([_timed(lambda q=q: retriever.encode_queries([q], k, sampling, rng=i))
                      for i, q in enumerate(queries)])
    label = f"think={k}, max_new_tokens={max_new_tokens}" if k else "no thinking"
    print(f"  query latency ({label}): p50 {1e3 * np.percentile(times, 50):.1f} ms, "
          f"p95 {1e3 * np.percentile(times, 95):.1f} ms over {len(queries)} single queries")


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.bench eval", description=__doc__.splitlines()[0])
  shared = os.environ.get("O1JAX_SHARED")
  parser.add_argument("--dataset", default=shared and os.path.join(shared, "data", "beir-scifact"))
  parser.add_argument("--synthetic_docs", type=int, default=100_000)
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--encode_docs", type=int, default=256, help="docs to time corpus encoding on")
  parser.add_argument("--checkpoint", help="o1jax model (exported HF dir or o1jax checkpoint) to time")
  parser.add_argument("--latency_queries", type=int, default=20)
  parser.add_argument("--think", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                      help="the o1jax model's weights and compute (as `python -m o1jax.eval --dtype`)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--skip_search", action="store_true", help="only the encoding and latency measurements")
  parser.add_argument("--json", default="", help="write the search comparisons and the machine here")
  args = parser.parse_args(argv)
  results = run(args)
  if args.json:
    protocol.write_json(args.json, "eval", {"settings": {"k": args.k, "synthetic_docs": args.synthetic_docs,
                                                         "queries": args.queries, "dim": args.dim},
                                            "search": results})


def run(args) -> dict[str, dict]:
  """The measurements `args` asks for; returns the search comparisons by name."""
  results = {}
  if not args.skip_search:
    docs, queries = clustered_corpus(args.synthetic_docs, args.queries, args.dim,
                                     clusters=args.synthetic_docs // 100)
    results["synthetic clustered"] = compare("synthetic clustered", docs, queries, args.k)

  if not args.dataset:
    print("SciFact skipped: pass --dataset or set O1JAX_SHARED")
    return results
  from o1jax.data.readers import load_beir
  from o1jax.eval.baselines import cached_doc_encoder
  from o1jax.retrieval.sentence_encoder import SentenceEncoder
  from o1jax.templates import document_text
  dataset = load_beir(args.dataset, "test")
  texts = [document_text(doc.title, doc.text) for doc in dataset.corpus.values()]
  encoder = SentenceEncoder()
  sample = texts[:args.encode_docs]
  encode_s = _timed(lambda: encoder.encode(sample))
  print(f"MiniLM corpus encoding: {len(sample) / encode_s:.1f} docs/s ({len(sample)} SciFact docs, "
        f"max_seq_length {encoder.max_seq_length}, torch CPU)")
  if args.checkpoint:
    o1jax_speed(args.checkpoint, sample, list(dataset.queries.values())[:args.latency_queries], args.think,
                args.max_new_tokens, args.dtype)
  if not args.skip_search:
    results["SciFact MiniLM"] = compare("SciFact MiniLM", cached_doc_encoder(encoder)(texts),
                                        encoder.encode(list(dataset.queries.values())), args.k)
  return results
