"""Bring your own training data: reference JSONL/Parquet, MS MARCO or BEIR files into the trainer's shards.

  python -m data_tools.ingest --input=train.jsonl --out=DIR [--teacher=NAME] [--revote] [--explore_missing ...]
  python -m data_tools.ingest --collection=collection.tsv --queries=queries.tsv --qrels=qrels.tsv \
      [--triples=qidpidtriples.tsv] --out=DIR --keep_missing
  python -m data_tools.ingest --triples=triples.tsv --out=DIR --keep_missing        # text triples
  python -m data_tools.ingest --dataset=BEIR_DIR --split=train --out=DIR --explore_missing --model=M.gguf

The formats, query ids and grouping are those of `data_tools.ingest_inputs`; `--format` is detected from the
inputs given. Shards, workers, restarts, `config.json` and `manifest.json` are those of `data_tools.shards`: a
killed run, run again, writes exactly the shards still missing, nothing lost or duplicated.

What a record keeps: the query, every positive and negative with its passage id when known, the teacher scores
(`pos_scores`, `neg_scores`; `teacher` = --teacher) and the task label (`type`). Thoughts:
  * a record with a `thought`: it is `thoughts[chosen]`, `vote` is "given" and `vote_totals` is 1 at `chosen`
    (the data chose); the `all_thought` candidates are `thoughts`, the `model2scores` members and scores the
    committee's. A thought that is not among the candidates (compared stripped) is appended as the last one,
    with NaN committee scores (no member scored it).
  * candidates but no thought: the stored scores choose by --vote (weights 1); without stored scores only the
    committee can (--revote or --explore_missing), else the record is bad.
  * neither (every MS MARCO or BEIR record): bad, unless --explore_missing (the expert writes --k candidates, the
    committee chooses) or --keep_missing (kept with the empty thought "", `vote` "none": it trains the path
    without thinking).
  * --revote: the committee (--members, as synthesize) re-scores every candidate against the first positive and
    chooses; its members and scores replace the stored ones.
Records without negatives get --num_negatives BM25-mined ones when the data has a corpus (`miner` "bm25").

Bad records (a malformed line, a missing or wrongly typed field, scores that do not match their passages, a repeated
query id, no thought where one is needed, a request the expert rejects) stop the run naming file, line and field,
before anything loads; with --skip_bad they are left out, counted and listed (`file:line`: reason) in the shard
sidecars and the manifest. An unavailable expert stops the run resumably, as in synthesize.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import sys
from typing import Any

import numpy as np

from data_tools import explore
from data_tools import options
from data_tools import shards
from data_tools import vote as vote_lib
from data_tools.ingest_inputs import Entry, Loaded, read_beir, read_judged, read_reference
from data_tools.record import ThoughtRecord
from o1jax.data import readers
from o1jax.templates import document_text

PROG = "python -m data_tools.ingest"
FORMATS = ("reference", "msmarco", "beir")
# Settings that do not change the output: excluded from config.json so workers and restarts may differ.
_RUNTIME_ONLY = ("num_workers", "worker_index", "out", "skip_bad", *options.EXPERT_RUNTIME_ONLY)


_INPUTS = {"reference": "--input", "msmarco": "--collection/--queries/--qrels/--triples", "beir": "--dataset"}


def _detect_format(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
  given = {"reference": bool(args.input),
           "msmarco": any((args.collection, args.queries, args.qrels, args.triples)), "beir": bool(args.dataset)}
  formats = [f for f, present in given.items() if present]
  if args.format is None and len(formats) != 1:
    p.error("give the inputs of one format: " + ", ".join(f"{option} ({f})" for f, option in _INPUTS.items()))
  chosen = args.format or formats[0]
  if formats != [chosen]:
    p.error(f"--format={chosen} takes {_INPUTS[chosen]}, got the inputs of {', '.join(formats) or 'no format'}")
  return chosen


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--format", choices=FORMATS, default=None, help="detected from the inputs when left out")
  p.add_argument("--input", nargs="+", action="extend", help="reference records: .jsonl/.json[.gz] or .parquet")
  p.add_argument("--collection", help="MS MARCO collection.tsv (pid<TAB>text) or a BEIR corpus.jsonl")
  p.add_argument("--queries", help="MS MARCO queries.tsv (qid<TAB>text) or a BEIR queries.jsonl")
  p.add_argument("--qrels", help="TREC 4-column or BEIR tsv qrels: positives graded > 0, negatives <= 0")
  p.add_argument("--triples", help="qid<TAB>pos_pid<TAB>neg_pid (with --collection and --queries), else "
                                   "query<TAB>pos<TAB>neg text")
  p.add_argument("--dataset", help="BEIR directory")
  p.add_argument("--split", default="train", help="BEIR split; also the shard file prefix")
  p.add_argument("--out", required=True)
  p.add_argument("--num_shards", type=int, default=16)
  p.add_argument("--num_workers", type=int, default=1)
  p.add_argument("--worker_index", type=int, default=0)
  p.add_argument("--limit", type=int, default=None,
                 help="only the first N records (reference: in file order; judged queries: in id order)")
  p.add_argument("--teacher", default="unknown", help="who gave pos_scores/neg_scores (the records' `teacher`)")
  p.add_argument("--revote", action="store_true", help="the committee re-scores every candidate and chooses")
  p.add_argument("--explore_missing", action="store_true",
                 help="records without a thought get --k candidates from the expert; the committee chooses")
  p.add_argument("--keep_missing", action="store_true", help="keep records without a thought, with an empty one")
  p.add_argument("--num_negatives", type=int, default=0,
                 help="BM25-mined negatives for records without any (needs a collection or BEIR corpus)")
  options.add_expert_options(p, model_required=False)
  options.add_committee_options(p)
  p.add_argument("--queries_per_batch", type=int, default=32)
  p.add_argument("--skip_bad", action="store_true",
                 help="skip and count bad records instead of failing (an unavailable expert still stops the run)")
  args = p.parse_args(argv)
  options.check_ranges(p, args, [
      ("num_shards", args.num_shards >= 1, ">= 1"), ("num_workers", args.num_workers >= 1, ">= 1"),
      ("limit", args.limit is None or args.limit >= 1, ">= 1 (leave it out for every record)"),
      ("num_negatives", args.num_negatives >= 0, ">= 0"), ("queries_per_batch", args.queries_per_batch >= 1, ">= 1")])
  if not 0 <= args.worker_index < args.num_workers:
    p.error(f"--worker_index must be in [0, {args.num_workers}), got {args.worker_index}")
  args.format = _detect_format(p, args)
  if args.format == "msmarco":
    if not (args.qrels or args.triples):
      p.error("--format=msmarco needs --qrels or --triples")
    if bool(args.collection) != bool(args.queries):
      p.error("--collection and --queries come together (ids triples and qrels need both)")
    if args.qrels and not args.collection:
      p.error("--qrels needs --collection and --queries")
  if args.explore_missing and args.keep_missing:
    p.error("--explore_missing and --keep_missing exclude each other")
  if args.format != "reference" and not (args.explore_missing or args.keep_missing):
    p.error(f"--format={args.format} records carry no thoughts: pass --explore_missing (the expert writes them) or "
            "--keep_missing (kept with an empty thought)")
  if args.explore_missing and not args.model:
    p.error("--explore_missing needs --model (the expert)")
  if args.num_negatives and not (args.dataset or args.collection):
    p.error(f"--num_negatives={args.num_negatives} mines from a corpus: it needs --collection or --dataset")
  options.check_expert_options(p, args)
  options.check_committee_options(p, args)
  return args


def output_config(args: argparse.Namespace) -> dict[str, Any]:
  return {k: v for k, v in sorted(vars(args).items()) if k not in _RUNTIME_ONLY}


def _thought_problem(entry: Entry, args: argparse.Namespace) -> str | None:
  """Why `entry` cannot get a thought under these options (None when it can)."""
  committee = args.revote or args.explore_missing
  if entry.thought or (entry.candidates and (entry.members or committee)):
    return None
  if entry.candidates:
    return ("missing, and no model2scores to choose among the all_thought candidates (--revote chooses with the "
            "committee)")
  if args.explore_missing or args.keep_missing:
    return None
  return ("missing (no thought and no all_thought candidate): --explore_missing writes one, --keep_missing keeps it "
          "empty")


def load(args: argparse.Namespace) -> Loaded:
  """Every record of the inputs; a record that cannot get a thought is bad. Without --skip_bad, the first bad one
  raises its DataFormatError."""
  if args.format == "reference":
    loaded = read_reference(args.input, args.limit)
  elif args.format == "beir":
    loaded = read_beir(args.dataset, args.split, args.limit)
  else:
    loaded = read_judged(args.collection, args.queries, args.qrels, args.triples, args.limit)
  entries = []
  for entry in loaded.entries:
    if entry.error is None and (problem := _thought_problem(entry, args)):
      entry = dataclasses.replace(entry, error=readers.DataFormatError(entry.path, entry.line, "thought", problem))
    if entry.error is not None and not args.skip_bad:
      raise entry.error
    entries.append(entry)
  if loaded.ignored_fields:
    print(f"ignored fields (records that carry them): {loaded.ignored_fields}", file=sys.stderr)
  unmined = sum(1 for e in entries if e.error is None and not e.negatives)
  if unmined and not args.num_negatives:
    hint = ": --num_negatives mines them with BM25 from the corpus" if loaded.corpus is not None else ""
    print(f"{unmined} records have no negatives, which training needs{hint}", file=sys.stderr)
  return dataclasses.replace(loaded, entries=entries)


@dataclasses.dataclass
class _Plan:
  """An entry's candidates and, when the data decided, its choice and committee."""
  entry: Entry
  thoughts: list[str]
  chosen: int | None = None
  vote: str = ""
  totals: np.ndarray | None = None


def _one_hot(k: int, i: int) -> np.ndarray:
  totals = np.zeros(k, np.float32)
  totals[i] = 1.0
  return totals


class Ingester:
  """Turns a batch of entries into ThoughtRecords; bad ones go to `bad` as `file:line` -> reason."""

  def __init__(self, args: argparse.Namespace, loaded: Loaded):
    self.args = args
    self.committee = options.make_committee(args) if args.revote or args.explore_missing else None
    self.exploration = None
    if args.explore_missing:
      pool = [e.train_query() for e in loaded.entries if e.error is None]
      self.exploration = explore.Exploration(options.make_expert(args), options.make_prompt_builder(args, pool),
                                             args.k, args.skip_bad)
    self.corpus, self.miner = loaded.corpus, None
    if loaded.corpus is not None and args.num_negatives > 0:
      from data_tools.mining import BM25Miner  # pylint: disable=g-import-not-at-top
      self.miner = BM25Miner(loaded.corpus)

  def _explore(self, entries: list[Entry], bad: dict[str, str]) -> dict[str, list[str]]:
    """Candidates of the entries with neither a thought nor candidates, under --explore_missing."""
    missing = [e for e in entries if not e.thought and not e.candidates]
    if not missing or self.exploration is None:
      return {}
    failed: dict[str, str] = {}
    found = self.exploration.candidates([e.train_query() for e in missing], failed)
    bad.update({e.where: failed[e.query_id] for e in missing if e.query_id in failed})
    return found

  def _plan(self, entry: Entry, explored: dict[str, list[str]]) -> _Plan:
    thoughts = list(entry.candidates)
    if entry.thought:
      stripped = [t.strip() for t in thoughts]
      if entry.thought.strip() not in stripped:
        thoughts.append(entry.thought)
      chosen = thoughts.index(entry.thought) if entry.thought in thoughts else stripped.index(entry.thought.strip())
      return _Plan(entry, thoughts, chosen, "given", _one_hot(len(thoughts), chosen))
    if thoughts and entry.members and not self.args.revote:
      result = vote_lib.vote(self.args.vote, entry.scores)
      return _Plan(entry, thoughts, result.winner, self.args.vote, result.totals)
    if thoughts or entry.query_id in explored:
      return _Plan(entry, thoughts or explored[entry.query_id])  # the committee chooses
    return _Plan(entry, [""], 0, "none", _one_hot(1, 0))  # --keep_missing

  def _stored_committee(self, plan: _Plan) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(members, weights, [members, k] scores) the data came with; NaN for an appended thought."""
    scores = np.full((len(plan.entry.members), len(plan.thoughts)), np.nan, np.float32)
    scores[:, :plan.entry.scores.shape[1]] = plan.entry.scores
    return plan.entry.members, np.ones(len(plan.entry.members), np.float32), scores

  def records(self, entries: list[Entry], bad: dict[str, str]) -> list[ThoughtRecord]:
    good = []
    for e in entries:
      if e.error is not None:
        bad[e.where] = str(e.error)
      else:
        good.append(e)
    explored = self._explore(good, bad)
    plans = [self._plan(e, explored) for e in good if e.where not in bad]
    judged = [p for p in plans if p.chosen is None or (self.args.revote and p.vote != "none")]
    verdicts = self.committee.judge([p.entry.positives[0] for p in judged], [p.thoughts for p in judged]) \
        if judged else []
    verdict_of = {id(p): v for p, v in zip(judged, verdicts)}
    unmined = [p.entry.train_query() for p in plans if not p.entry.negatives]
    mined = self.miner.mine(unmined, self.args.num_negatives) if self.miner and unmined else {}
    out = []
    for p in plans:
      e = p.entry
      if id(p) in verdict_of:
        v = verdict_of[id(p)]
        members, weights, scores = tuple(self.committee.names), self.committee.weights, v.scores
        chosen, vote, totals = v.winner, self.args.vote, v.totals
      else:
        (members, weights, scores), chosen, vote, totals = self._stored_committee(p), p.chosen, p.vote, p.totals
      negative_ids, negatives, miner = e.negative_ids, e.negatives, ""
      if mined.get(e.query_id):
        negative_ids, miner = tuple(mined[e.query_id]), "bm25"
        negatives = tuple(document_text(self.corpus[d].title, self.corpus[d].text) for d in negative_ids)
      scored = e.positive_scores is not None
      out.append(ThoughtRecord(
          query_id=e.query_id, query=e.query, thoughts=tuple(p.thoughts), chosen=chosen, positives=e.positives,
          negatives=negatives, positive_ids=e.positive_ids, negative_ids=negative_ids, committee_members=members,
          committee_weights=weights, committee_scores=scores, vote=vote, vote_totals=totals,
          positive_scores=e.positive_scores if scored else np.zeros(0, np.float32),
          negative_scores=e.negative_scores if scored else np.zeros(0, np.float32),
          teacher=self.args.teacher if scored else "", miner=miner, task_type=e.task_type))
    return out


def main(argv: Sequence[str]) -> dict[str, Any]:
  args = parse_args(argv)
  loaded = load(args)
  return shards.write_shards(
      args.out, args.split, args.num_shards, args.num_workers, args.worker_index, loaded.entries,
      lambda: Ingester(args, loaded).records, output_config(args), args.queries_per_batch, "ingest",
      **options.EXPERT_RETRY)


def run(argv: Sequence[str]) -> None:
  """The command line: bad input and an unavailable expert end it with one line and exit status 1."""
  shards.run_command(PROG, main, argv, options.EXPERT_ERRORS)


def cli() -> None:
  """`python -m data_tools.ingest` and the `o1jax-ingest` command."""
  run(sys.argv[1:])


if __name__ == "__main__":
  cli()
