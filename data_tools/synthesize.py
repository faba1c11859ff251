"""Thought synthesis into sharded TFRecords: exploration, committee refinement, hard-negative mining.

  python -m data_tools.synthesize --dataset=BEIR_DIR --split=train --out=DIR --num_shards=16 \
      --expert=local --model=SmolLM2-135M-Instruct.Q4_1.gguf --members=bm25,st [--num_workers N --worker_index i]

Query q goes to shard `stable_hash(q) % num_shards`, whatever the worker count or limit; shard s belongs to
worker `s % num_workers`. A shard is written to `<name>.tmp` and renamed when complete, after its sidecar
`<name>.json` (count, sha256, skipped queries) is in place, so a shard under its final name is always whole and
described. A restarted run skips those shards and redoes the rest: nothing lost, nothing duplicated.
`config.json` pins the settings of an output directory; `manifest.json` (counts, checksums, config) is written
by whichever worker sees the last shard finished.

Bad queries (no query text, no positive passage, a request the expert rejects with HTTP 4xx, or only empty
answers) stop the run naming the query, or with --skip_bad are left out and listed with their reason in the
shard's sidecar and the manifest. An expert that is unavailable (HTTP 429 / 5xx, timeouts, refused connections,
after --max_attempts) is never a bad query: the worker stops before completing the shard it was writing, and
the same command run again synthesizes exactly the shards still missing. Empty answers are never thoughts: a
query keeps its non-empty candidates (fewer than --k when some answers were empty).
"""
from __future__ import annotations

import argparse
import collections
from collections.abc import Sequence
import dataclasses
import json
import pathlib
import sys
from typing import Any

import tqdm

from data_tools import explore
from data_tools import inputs
from data_tools.committee import BM25Member, Committee, Member, sentence_transformer_member
from data_tools.record import ThoughtRecord
from o1jax.data import readers
from o1jax.data import tfrecord
from o1jax.files import atomic_write_json
from o1jax.templates import document_text

# Settings that do not change the output: excluded from config.json so workers and restarts may differ.
_RUNTIME_ONLY = ("num_workers", "worker_index", "out", "concurrency", "timeout_s", "max_attempts",
                 "skip_bad", "api_key_env", "base_url")
PROG = "python -m data_tools.synthesize"
MEMBERS = ("bm25", "st")


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
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--k", type=int, default=3, help="candidate thoughts per query")
  p.add_argument("--num_examples", type=int, default=3, help="in-context (query, positive) pairs per prompt")
  p.add_argument("--example_max_words", type=int, default=64)
  p.add_argument("--expert", choices=("local", "http"), default="local")
  p.add_argument("--model", required=True, help="local: .gguf file or HF dir; http: the served model name")
  p.add_argument("--base_url", help="http: e.g. http://127.0.0.1:8000/v1")
  p.add_argument("--api_key_env", help="http: name of the env var that holds the API key")
  p.add_argument("--concurrency", type=int, default=8)
  p.add_argument("--timeout_s", type=float, default=120.0)
  p.add_argument("--max_attempts", type=int, default=5)
  p.add_argument("--max_new_tokens", type=int, default=512)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--batch_size", type=int, default=8, help="local: prompts per generation batch")
  p.add_argument("--members", default="bm25,st", help="comma list of bm25, st (sentence-transformers)")
  p.add_argument("--st_model", default=None, help="sentence-transformers model (default: offline MiniLM)")
  p.add_argument("--member_weights", default=None, help="comma list of floats, one per member")
  p.add_argument("--vote", choices=("soft", "hard"), default="soft")
  p.add_argument("--num_negatives", type=int, default=15, help="BM25-mined negatives when the data has none")
  p.add_argument("--queries_per_batch", type=int, default=32)
  p.add_argument("--skip_bad", action="store_true",
                 help="skip and count bad queries instead of failing (an unavailable expert still stops the run)")
  args = p.parse_args(argv)
  for option, ok, want in [
      ("num_shards", args.num_shards >= 1, ">= 1"), ("num_workers", args.num_workers >= 1, ">= 1"),
      ("limit", args.limit is None or args.limit >= 1, ">= 1 (leave it out for every query)"),
      ("k", args.k >= 1, ">= 1"), ("num_examples", args.num_examples >= 0, ">= 0"),
      ("example_max_words", args.example_max_words >= 1, ">= 1"), ("concurrency", args.concurrency >= 1, ">= 1"),
      ("timeout_s", 0 < args.timeout_s < float("inf"), "a positive number of seconds"),
      ("max_attempts", args.max_attempts >= 1, ">= 1"), ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
      ("temperature", 0 <= args.temperature < float("inf"), ">= 0"), ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
      ("batch_size", args.batch_size >= 1, ">= 1"), ("num_negatives", args.num_negatives >= 0, ">= 0"),
      ("queries_per_batch", args.queries_per_batch >= 1, ">= 1")]:
    if not ok:
      p.error(f"--{option} must be {want}, got {getattr(args, option)}")
  if not 0 <= args.worker_index < args.num_workers:
    p.error(f"--worker_index must be in [0, {args.num_workers}), got {args.worker_index}")
  if args.expert == "http" and not args.base_url:
    p.error("--expert=http needs --base_url")
  members = args.members.split(",")
  unknown = [m for m in members if m not in MEMBERS]
  if unknown or len(set(members)) != len(members):
    p.error(f"--members must name distinct members among {', '.join(MEMBERS)}, got {args.members!r}")
  if args.member_weights is not None:
    try:
      weights = [float(w) for w in args.member_weights.split(",")]
    except ValueError:
      weights = []
    if (len(weights) != len(members) or not all(0 <= w < float("inf") for w in weights) or not sum(weights)):
      p.error(f"--member_weights must be {len(members)} non-negative numbers, not all 0, one per member of "
              f"--members={args.members}, got {args.member_weights!r}")
  return args


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:  # bad JSON or bad UTF-8
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(content, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
  return content


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def shard_of(query_id: str, num_shards: int) -> int:
  return inputs.stable_hash("shard", query_id) % num_shards


def output_config(args: argparse.Namespace) -> dict[str, Any]:
  return {k: v for k, v in sorted(vars(args).items()) if k not in _RUNTIME_ONLY}


def pin_config(out: pathlib.Path, config: dict[str, Any]) -> None:
  """Writes config.json, or checks an existing one: shards of two configs must never mix."""
  path = out / "config.json"
  if path.exists():
    previous = _read_json(path)
    changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
    if changed:
      raise ValueError(f"{path}: this output directory was made with other settings {changed} "
                       "(old, new); use a new --out")
  else:
    atomic_write_json(path, config)


@dataclasses.dataclass
class Data:
  queries: list[inputs.TrainQuery]  # all queries of the split: the pool of in-context examples
  corpus: dict[str, readers.Doc] | None  # for mining (BEIR only)


def load_data(args: argparse.Namespace) -> Data:
  if args.dataset:
    beir = readers.load_beir(args.dataset, args.split)
    return Data(inputs.from_beir(beir), beir.corpus)
  return Data(inputs.from_grouped_jsonl(args.grouped), None)


def make_expert(args: argparse.Namespace) -> explore.Expert:
  if args.expert == "http":
    from data_tools.http_expert import HttpExpert, HttpExpertConfig  # pylint: disable=g-import-not-at-top
    return HttpExpert(HttpExpertConfig(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, concurrency=args.concurrency, timeout_s=args.timeout_s,
        max_attempts=args.max_attempts))
  from data_tools.local_expert import LocalExpert, LocalExpertConfig  # pylint: disable=g-import-not-at-top
  return LocalExpert.from_checkpoint(args.model, LocalExpertConfig(
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
      batch_size=args.batch_size, seed=args.seed))


def make_committee(args: argparse.Namespace) -> Committee:
  members: list[Member] = []
  for name in args.members.split(","):
    if name == "bm25":
      members.append(BM25Member())
      continue
    try:
      members.append(sentence_transformer_member(args.st_model))
    except OSError as e:
      raise ValueError(f"--st_model={args.st_model}: cannot load the sentence-transformers model: {e}") from e
  weights = [float(w) for w in args.member_weights.split(",")] if args.member_weights else None
  return Committee(members, weights, args.vote)


class Synthesizer:
  """Turns a batch of queries into ThoughtRecords; with skip_bad, bad queries are set aside with a reason."""

  def __init__(self, args: argparse.Namespace, data: Data):
    self.args = args
    try:
      self.builder = explore.PromptBuilder(data.queries, args.seed, args.num_examples, args.example_max_words)
    except ValueError as e:
      raise ValueError(f"--num_examples={args.num_examples}: {e}") from e
    self.expert = make_expert(args)
    self.committee = make_committee(args)
    self.corpus = data.corpus
    self.miner = None
    if data.corpus is not None and args.num_negatives > 0:
      from data_tools.mining import BM25Miner  # pylint: disable=g-import-not-at-top
      self.miner = BM25Miner(data.corpus)

  def _skippable(self, error: Exception) -> bool:
    # An unavailable expert is never the query's fault: skipping the query would drop it, for good, from a shard
    # marked complete; failing leaves the shard to the next run.
    return self.args.skip_bad and not isinstance(error, explore.ExpertUnavailable)

  def _set_aside(self, query_id: str, error: Exception, bad: dict[str, str]) -> None:
    if not self._skippable(error):
      raise error
    bad[query_id] = str(error)

  def _explore(self, queries: list[inputs.TrainQuery], bad: dict[str, str]) -> dict[str, list[str]]:
    try:
      return explore.explore(self.expert, self.builder, queries, self.args.k)
    except explore.ExpertError as e:
      if not self._skippable(e):
        raise
      if len(queries) == 1:
        bad[queries[0].query_id] = str(e)
        return {}
    thoughts = {}  # find the failing queries one by one
    for q in queries:
      try:
        thoughts.update(explore.explore(self.expert, self.builder, [q], self.args.k))
      except explore.ExpertError as e:
        self._set_aside(q.query_id, e, bad)
    return thoughts

  def records(self, queries: list[inputs.TrainQuery], bad: dict[str, str]) -> list[ThoughtRecord]:
    good = []
    for q in queries:
      try:
        inputs.check_query(q)
        good.append(q)
      except ValueError as e:
        self._set_aside(q.query_id, e, bad)
    thoughts = self._explore(good, bad)
    for q in good:
      if q.query_id in thoughts and not thoughts[q.query_id]:
        self._set_aside(q.query_id, explore.ExpertError(
            f"query {q.query_id!r}: the expert answered all {self.args.k} candidates with empty text"), bad)
    good = [q for q in good if thoughts.get(q.query_id)]
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


def write_shard(path: pathlib.Path, shard: int, queries: list[inputs.TrainQuery], synth: Synthesizer,
                batch: int, progress: tqdm.tqdm) -> dict[str, Any]:
  bad: dict[str, str] = {}
  with tfrecord.TFRecordWriter(path) as writer:
    for start in range(0, len(queries), batch):
      chunk = queries[start:start + batch]
      for record in synth.records(chunk, bad):
        writer.write(record.to_example())
      progress.update(len(chunk))
    info = {"shard": shard, "file": path.name, "num_records": writer.num_records, "sha256": writer.sha256,
            "skipped": bad}
    atomic_write_json(path.with_name(path.name + ".json"), info)  # before the rename: a shard is never undescribed
  return info


def write_manifest(out: pathlib.Path, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any] | None:
  """manifest.json once every shard is complete (any worker may write it; the content is the same)."""
  names = [shard_name(args.split, s, args.num_shards) for s in range(args.num_shards)]
  if not all((out / n).exists() for n in names):
    return None
  shards = [_read_json(out / (n + ".json")) for n in names]
  manifest = {"config": config, "num_shards": args.num_shards, "shards": shards,
              "num_records": sum(s["num_records"] for s in shards),
              "num_skipped": sum(len(s["skipped"]) for s in shards)}
  atomic_write_json(out / "manifest.json", manifest)
  return manifest


def main(argv: Sequence[str]) -> dict[str, Any]:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  config = output_config(args)
  pin_config(out, config)
  data = load_data(args)
  selected = data.queries[:args.limit] if args.limit is not None else data.queries
  by_shard: dict[int, list[inputs.TrainQuery]] = collections.defaultdict(list)
  for q in selected:
    by_shard[shard_of(q.query_id, args.num_shards)].append(q)
  mine = [s for s in range(args.num_shards) if s % args.num_workers == args.worker_index]
  todo = [s for s in mine if not (out / shard_name(args.split, s, args.num_shards)).exists()]
  print(f"worker {args.worker_index}/{args.num_workers}: {len(mine)} shards, {len(mine) - len(todo)} already "
        f"complete, {sum(len(by_shard[s]) for s in todo)} queries to synthesize", file=sys.stderr)
  skipped: dict[str, str] = {}
  if todo:
    synth = Synthesizer(args, data)
    with tqdm.tqdm(total=sum(len(by_shard[s]) for s in todo), unit="query", desc="synthesize") as progress:
      for done, s in enumerate(todo):
        try:
          info = write_shard(out / shard_name(args.split, s, args.num_shards), s, by_shard[s], synth,
                             args.queries_per_batch, progress)
        except explore.ExpertUnavailable as e:
          raise explore.ExpertUnavailable(
              f"{e}; stopped before completing shard {s} ({done} of {len(todo)} shards written by this run, "
              "kept): run the same command again once the expert answers") from e
        skipped.update(info["skipped"])
  manifest = write_manifest(out, args, config)
  for query_id, reason in sorted(skipped.items()):
    print(f"skipped query {query_id!r}: {reason}", file=sys.stderr)
  print(f"worker {args.worker_index}: {len(todo)} shards written, {len(skipped)} bad queries skipped; "
        f"manifest {'written' if manifest else 'pending other workers'}", file=sys.stderr)
  return {"shards_written": todo, "skipped": skipped, "manifest": manifest}


def run(argv: Sequence[str]) -> None:
  """The command line: input errors and an unavailable expert end it with one line and exit status 1."""
  try:
    main(argv)
  except (ValueError, OSError, explore.ExpertError) as e:
    sys.exit(f"{PROG}: {' '.join(str(e).splitlines())}")


def cli() -> None:
  """`python -m data_tools.synthesize` and the `o1jax-synthesize` command."""
  run(sys.argv[1:])


if __name__ == "__main__":
  cli()
