"""Data benchmark: committee scoring throughput and reading + decoding synthesized shards.

  python -m o1jax.bench data --dataset=$O1JAX_SHARED/data/beir-scifact [--num_queries=200] [--k=3]

Candidate "thoughts" are real SciFact passages clipped to 48 words (the length of a generated thought), so
member costs are realistic; no expert is run. Rates are measured in the same run and printed with ratios.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from data_tools import inputs
from data_tools.committee import BM25Member, Committee, sentence_transformer_member
from data_tools.record import ThoughtRecord, read_shard
from o1jax.data import readers
from o1jax.data import tfrecord


def _rate(fn, count: int) -> float:
  start = time.perf_counter()
  fn()
  return count / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m o1jax.bench data")
  p.add_argument("--dataset", required=True, help="BEIR directory, e.g. shared/data/beir-scifact")
  p.add_argument("--num_queries", type=int, default=200)
  p.add_argument("--k", type=int, default=3)
  p.add_argument("--num_records", type=int, default=5000, help="records in the shard that is read back")
  args = p.parse_args(argv)

  beir = readers.load_beir(args.dataset, "train")
  queries = [q for q in inputs.from_beir(beir) if q.positives][:args.num_queries]
  docs = [inputs.doc_text(d) for d in beir.corpus.values()]
  rng = np.random.default_rng(0)
  candidates = [[" ".join(docs[i].split()[:48]) for i in rng.choice(len(docs), args.k, replace=False)]
                for _ in queries]
  positives = [q.positives[0] for q in queries]
  n = len(queries)

  bm25, minilm = BM25Member(), sentence_transformer_member()
  minilm.score(positives[:4], candidates[:4])  # model warm-up outside the timing
  bm25_rate = _rate(lambda: bm25.score(positives, candidates), n)
  minilm_rate = _rate(lambda: minilm.score(positives, candidates), n)
  committee = Committee([bm25, minilm])
  verdicts = []
  committee_rate = _rate(lambda: verdicts.extend(committee.judge(positives, candidates)), n)

  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "bench-00000-of-00001.tfrecord"
    with tfrecord.TFRecordWriter(path) as writer:
      for i in range(args.num_records):
        q, v = queries[i % n], verdicts[i % n]
        writer.write(ThoughtRecord(
            query_id=f"{q.query_id}-{i}", query=q.query, thoughts=tuple(candidates[i % n]), chosen=v.winner,
            positives=q.positives, negatives=tuple(docs[:15]), positive_ids=q.positive_ids, negative_ids=(),
            committee_members=tuple(committee.names), committee_weights=committee.weights,
            committee_scores=v.scores, vote="soft", vote_totals=v.totals).to_example())
    size_mb = path.stat().st_size / 1e6
    frame_rate = _rate(lambda: tfrecord.count_records(path), args.num_records)
    decode_rate = _rate(lambda: read_shard(path), args.num_records)

  print(f"committee scoring ({n} queries x k={args.k}): bm25 {bm25_rate:.1f} q/s, MiniLM {minilm_rate:.1f} q/s, "
        f"full committee + soft vote {committee_rate:.1f} q/s")
  print(f"shard read ({args.num_records} records, {size_mb:.1f} MB, 15 negatives each): framing+CRC "
        f"{frame_rate:.0f} rec/s ({frame_rate * size_mb / args.num_records:.1f} MB/s), read+decode to records "
        f"{decode_rate:.0f} rec/s")
  print(f"ratios: read+decode / committee = {decode_rate / committee_rate:.0f}x; "
        f"MiniLM / BM25 member speed = {minilm_rate / bm25_rate:.2f}x")
