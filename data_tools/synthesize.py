"""Thought synthesis into sharded TFRecords: exploration, committee refinement, hard-negative mining.

  python -m data_tools.synthesize --dataset=BEIR_DIR --split=train --out=DIR --num_shards=16 \
      --expert=local --model=SmolLM2-135M-Instruct.Q4_1.gguf --members=bm25,st [--num_workers N --worker_index i]

Shards, workers, restarts, `config.json` and `manifest.json` are those of `data_tools.shards`: a restarted run
writes exactly the shards still missing.

Bad queries (no query text, no positive passage, a request the expert rejects with HTTP 4xx, or only empty
answers) stop the run naming the query, or with --skip_bad are left out and listed with their reason in the
shard's sidecar and the manifest. An expert that is unavailable (HTTP 429 / 5xx, timeouts, refused connections,
after --max_attempts) is never a bad query: the worker stops before completing the shard it was writing, and
the same command run again synthesizes exactly the shards still missing. Empty answers are never thoughts: a
query keeps its non-empty candidates (fewer than --k when some answers were empty).
"""
from __future__ import annotations

from o1jax import host_allocator

if __name__ == "__main__":  # before jax, TensorFlow and PyTorch start their threads and allocate
  host_allocator.reexec_on_cpu()

import argparse
from collections.abc import Sequence
import dataclasses
import sys
from typing import Any

from data_tools import explore
from data_tools import inputs
from data_tools import options
from data_tools import shards
from data_tools.record import ThoughtRecord
from o1jax.data import readers
from o1jax.templates import document_text

# Settings that do not change the output: excluded from config.json so workers and restarts may differ.
_RUNTIME_ONLY = ("num_workers", "worker_index", "out", "skip_bad", *options.EXPERT_RUNTIME_ONLY)
PROG = "python -m data_tools.synthesize"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--dataset", help="BEIR directory (corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv)")
  source.add_argument("--grouped", help="grouped jsonl {query_id?, query, pos: [...], neg: [...]}")
  p.add_argument("--split", default="train")
  p.add_argument("--out", required=True)
  p.add_argument("--num_shards", type=int, default=16)
  p.add_argument("--num_workers", type=int, default=1)
  p.add_argument("--worker_index", type=int, default=0)
  p.add_argument("--limit", type=int, default=None, help="only the first N queries in id order")
  options.add_expert_options(p, model_required=True)
  options.add_committee_options(p)
  p.add_argument("--num_negatives", type=int, default=15, help="BM25-mined negatives when the data has none")
  p.add_argument("--queries_per_batch", type=int, default=32)
  p.add_argument("--skip_bad", action="store_true",
                 help="skip and count bad queries instead of failing (an unavailable expert still stops the run)")
  args = p.parse_args(argv)
  options.check_ranges(p, args, [
      ("num_shards", args.num_shards >= 1, ">= 1"), ("num_workers", args.num_workers >= 1, ">= 1"),
      ("limit", args.limit is None or args.limit >= 1, ">= 1 (leave it out for every query)"),
      ("num_negatives", args.num_negatives >= 0, ">= 0"), ("queries_per_batch", args.queries_per_batch >= 1, ">= 1")])
  if not 0 <= args.worker_index < args.num_workers:
    p.error(f"--worker_index must be in [0, {args.num_workers}), got {args.worker_index}")
  options.check_expert_options(p, args)
  options.check_committee_options(p, args)
  return args


def output_config(args: argparse.Namespace) -> dict[str, Any]:
  return {k: v for k, v in sorted(vars(args).items()) if k not in _RUNTIME_ONLY}


@dataclasses.dataclass
class Data:
  queries: list[inputs.TrainQuery]  # all queries of the split: the pool of in-context examples
  corpus: dict[str, readers.Doc] | None  # for mining (BEIR only)


def load_data(args: argparse.Namespace) -> Data:
  if args.dataset:
    beir = readers.load_beir(args.dataset, args.split)
    return Data(inputs.from_beir(beir), beir.corpus)
  return Data(inputs.from_grouped_jsonl(args.grouped), None)


class Synthesizer:
  """Turns a batch of queries into ThoughtRecords; with skip_bad, bad queries are set aside with a reason."""

  def __init__(self, args: argparse.Namespace, data: Data):
    self.args = args
    builder = options.make_prompt_builder(args, data.queries)
    self.exploration = explore.Exploration(options.make_expert(args), builder, args.k, args.skip_bad)
    self.committee = options.make_committee(args)
    self.corpus = data.corpus
    self.miner = None
    if data.corpus is not None and args.num_negatives > 0:
      from data_tools.mining import BM25Miner  # pylint: disable=g-import-not-at-top
      self.miner = BM25Miner(data.corpus)

  def records(self, queries: list[inputs.TrainQuery], bad: dict[str, str]) -> list[ThoughtRecord]:
    good = []
    for q in queries:
      try:
        inputs.check_query(q)
        good.append(q)
      except ValueError as e:
        self.exploration.set_aside(q.query_id, e, bad)
    thoughts = self.exploration.candidates(good, bad)
    good = [q for q in good if q.query_id in thoughts]
    negative_ids = self.miner.mine(good, self.args.num_negatives) if self.miner else {}
    verdicts = self.committee.judge([q.positives[0] for q in good], [thoughts[q.query_id] for q in good])
    out = []
    for q, verdict in zip(good, verdicts):
      neg_ids = tuple(negative_ids.get(q.query_id, ()))
      negatives = (tuple(document_text(self.corpus[d].title, self.corpus[d].text) for d in neg_ids) if neg_ids
                   else q.negatives)
      out.append(ThoughtRecord(
          query_id=q.query_id, query=q.query, thoughts=tuple(thoughts[q.query_id]), chosen=verdict.winner,
          positives=q.positives, negatives=negatives, positive_ids=q.positive_ids, negative_ids=neg_ids,
          committee_members=tuple(self.committee.names), committee_weights=self.committee.weights,
          committee_scores=verdict.scores, vote=self.args.vote, vote_totals=verdict.totals))
    return out


def main(argv: Sequence[str]) -> dict[str, Any]:
  args = parse_args(argv)
  data = load_data(args)
  selected = data.queries[:args.limit] if args.limit is not None else data.queries
  return shards.write_shards(
      args.out, args.split, args.num_shards, args.num_workers, args.worker_index, selected,
      lambda: Synthesizer(args, data).records, output_config(args), args.queries_per_batch, "synthesize",
      **options.EXPERT_RETRY)


def run(argv: Sequence[str]) -> None:
  """The command line: input errors and an unavailable expert end it with one line and exit status 1."""
  shards.run_command(PROG, main, argv, options.EXPERT_ERRORS)


def cli() -> None:
  """`python -m data_tools.synthesize` and the `o1jax-synthesize` command."""
  host_allocator.reexec_on_cpu()  # the o1jax-synthesize command (`python -m` re-executed at the top already)
  run(sys.argv[1:])


if __name__ == "__main__":
  cli()
