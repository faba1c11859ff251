"""Where does thinking lose its gain? The expert's and an oracle's thoughts for the evaluated queries, and how close
every source of thoughts comes to the relevant documents.

  python -m data_tools.diagnose --dataset=BEIR_DIR --split=test [--max_queries=N] --out=DIR \
      --expert=local --model=SmolLM2-135M-Instruct.Q4_1.gguf --k=2 --max_new_tokens=40 \
      [--num_examples=3 --example_split=train] [--members=bm25,st] [--score=NAME=THOUGHTS_JSONL ...] \
      [--oracle_words=32] [--candidates_from=EARLIER_OUT/candidates.thoughts.jsonl]

The queries are the split's first `--max_queries` judged ones, as `python -m o1jax.eval --max_queries` takes them.
The expert writes `--k` candidates per query with the same exploration options as `data_tools.synthesize`, and the
committee votes as it does in synthesis. In-context examples, if any, are (query, positive) pairs of
`--example_split` (the split the model trained on), never of the evaluated split: those would put its labels in the
prompts. Writes, as thoughts files `python -m o1jax.eval --thoughts_from=NAME=FILE`
reads (text only; the embedding model tokenizes them):
  expert.thoughts.jsonl         the expert's first candidate: what it writes for a query it has no answer for
  expert-chosen.thoughts.jsonl  the committee's choice: it compared the candidates with a relevant document, so this
                                uses the test labels (as it does for training data): label-informed
  oracle.thoughts.jsonl         the first `--oracle_words` words of a relevant document (the lowest id): an upper
                                bound of what any thought could carry, not a system
  candidates.thoughts.jsonl     every candidate the expert wrote (empty ones left out), in its order: what
                                `--candidates_from` takes, so a run with the same queries and expert options can
                                skip the expert (the recipe's --reuse does, for a lever that changes training only)
and `quality.json` with the table it prints: per source (the query text alone, the expert's candidates, the
chosen one, the oracle, and every `--score` file, e.g. the thoughts `o1jax.eval --out` wrote for the trained
model), the mean MiniLM cosine between a thought and the query's first relevant document (the committee's dense
member), the share of a thought's distinct words found in a relevant document, and the number of those words the
query itself lacks (what a thought adds); and the committee's view of its own choice: each member's mean score of
the chosen candidate against a random one (the mean over candidates), and how often the first candidate won.
Words are lower-cased identifiers (`[A-Za-z_][A-Za-z0-9_]*`, so code keeps `read_csv` whole) minus English
stopwords. Bad input ends the command with one line.
"""
from __future__ import annotations

from o1jax import host_allocator

if __name__ == "__main__":  # before jax, TensorFlow and PyTorch start their threads and allocate
  host_allocator.reexec_on_cpu()

import argparse
from collections.abc import Sequence
import dataclasses
import re
import sys
from typing import Any
import warnings

import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from data_tools import explore, inputs, options, shards
from data_tools.committee import Committee, DenseMember
from o1jax import storage
from o1jax.data import readers
from o1jax.eval import retriever_eval, thoughts_file
from o1jax.eval.thoughts_file import QueryThoughts, read_thoughts, write_thoughts
from o1jax.files import atomic_write_json
from o1jax.templates import document_text

PROG = "python -m data_tools.diagnose"
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STOPWORDS = frozenset(STOPWORDS_EN)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl[.gz], queries.jsonl, qrels/)")
  p.add_argument("--split", default="test")
  p.add_argument("--max_queries", type=int, default=0, help="the first N judged queries, as o1jax.eval (0 = all)")
  p.add_argument("--out", required=True)
  p.add_argument("--score", action="append", default=[], metavar="NAME=FILE",
                 help="repeatable: a thoughts file to measure too (e.g. the trained model's, from o1jax.eval --out)")
  p.add_argument("--oracle_words", type=int, default=32, help="words of the relevant document in the oracle thought")
  p.add_argument("--queries_per_batch", type=int, default=32)
  p.add_argument("--candidates_from", default="", metavar="FILE",
                 help="the expert's candidates from an earlier run with these queries and expert options (its "
                      "candidates.thoughts.jsonl); the expert does not run")
  p.add_argument("--example_split", default="",
                 help="the split whose (query, positive) pairs are the in-context examples (needed with --num_examples)")
  options.add_expert_options(p, model_required=True)
  options.add_committee_options(p)
  p.set_defaults(num_examples=0)
  args = p.parse_args(argv)
  options.check_ranges(p, args, [
      ("max_queries", args.max_queries >= 0, ">= 0 (0 = all)"), ("oracle_words", args.oracle_words >= 1, ">= 1"),
      ("queries_per_batch", args.queries_per_batch >= 1, ">= 1")])
  if args.num_examples and not args.example_split:
    p.error(f"--num_examples={args.num_examples} needs --example_split (the split to draw examples from)")
  # Examples from the evaluated split would be other evaluated queries' relevant documents: labels in the prompt.
  if args.example_split == args.split:
    p.error(f"--example_split={args.example_split}: the evaluated split; examples would show its labels")
  options.check_expert_options(p, args)
  options.check_committee_options(p, args)
  if "st" not in args.members.split(","):
    p.error(f"--members={args.members}: the MiniLM cosine needs the st member")
  try:
    args.score = thoughts_file.named_files("--score", args.score, reserved=SOURCES)
  except ValueError as e:
    p.error(str(e))
  if args.candidates_from and not storage.exists(args.candidates_from):
    p.error(f"--candidates_from={args.candidates_from}: no such file")
  return args


SOURCES = ("query", "expert", "expert-random", "expert-chosen", "oracle")


def words(text: str) -> set[str]:
  """The distinct lower-cased words of `text` that are not English stopwords."""
  return {w for w in (m.lower() for m in _WORD.findall(text)) if w not in _STOPWORDS}


@dataclasses.dataclass(frozen=True)
class Query:
  query_id: str
  query: str
  relevant: tuple[str, ...]  # relevant documents as `title text`, by id


@dataclasses.dataclass(frozen=True)
class Quality:
  """Means over queries of each query's mean over its thoughts."""
  thoughts_per_query: float
  words: float  # distinct words of a thought
  minilm_cosine: float  # with the query's first relevant document
  share_in_relevant: float  # share of a thought's words found in a relevant document (thoughts with words)
  new_relevant_words: float  # words found in a relevant document that the query lacks


def quality(queries: Sequence[Query], thoughts: Sequence[Sequence[str]], dense: DenseMember) -> Quality:
  """How close `thoughts[i]` (query i's, any number >= 1) come to query i's relevant documents. An empty thought
  (a model may end its thought at once) has no words and no cosine."""
  flat = [(i, t) for i, per_query in enumerate(thoughts) for t in per_query]
  written = [(i, t) for i, t in flat if t.strip()]
  cosines = iter(dense.score([queries[i].relevant[0] for i, _ in written], [[t] for _, t in written])[:, 0] / 100.0
                 if written else [])
  rows: list[list[tuple[float, ...]]] = [[] for _ in queries]
  for i, text in flat:
    found = words(text)
    hits = found & set().union(*(words(d) for d in queries[i].relevant))
    share = len(hits) / len(found) if found else np.nan
    cosine = float(next(cosines)) if text.strip() else np.nan
    rows[i].append((len(found), cosine, share, len(hits - words(queries[i].query))))
  with warnings.catch_warnings():  # a query whose thoughts are all empty has no mean cosine: left out of the means
    warnings.simplefilter("ignore", RuntimeWarning)
    per_query = np.array([np.nanmean(np.array(r, np.float64), axis=0) for r in rows])
    means = [float(np.nanmean(column)) for column in per_query.T]
  return Quality(float(np.mean([len(t) for t in thoughts])), *means)


def load_splits(args: argparse.Namespace) -> dict[str, readers.BeirDataset]:
  """The evaluated split and, with in-context examples, `--example_split`: the corpus and queries read once."""
  return readers.load_beir_splits(args.dataset, [args.split, *([args.example_split] if args.num_examples else [])])


def load_queries(args: argparse.Namespace, splits: dict[str, readers.BeirDataset]) -> list[Query]:
  data = retriever_eval.first_queries(splits[args.split], args.max_queries)
  out = []
  for q in data.queries:
    relevant = tuple(sorted(d for d, grade in data.qrels[q].items() if grade > 0))
    if not relevant:
      raise ValueError(f"{args.dataset}: query {q!r} has no relevant document in qrels/{args.split}")
    out.append(Query(q, data.queries[q], tuple(document_text(data.corpus[d].title, data.corpus[d].text)
                                               for d in relevant)))
  return out


def example_pool(args: argparse.Namespace, splits: dict[str, readers.BeirDataset]) -> list[inputs.TrainQuery]:
  """The (query, positive) pairs in-context examples are drawn from: `--example_split`'s, none without examples."""
  return inputs.from_beir(splits[args.example_split]) if args.num_examples else []


def expert_candidates(args: argparse.Namespace, queries: Sequence[Query], prompts: explore.PromptBuilder
                      ) -> dict[str, list[str]]:
  """The expert's non-empty candidates per query, in batches of `--queries_per_batch` with a progress line."""
  train_like = [inputs.TrainQuery(q.query_id, q.query, q.relevant[:1]) for q in queries]
  exploration = explore.Exploration(options.make_expert(args), prompts, args.k, skip_bad=False)
  found: dict[str, list[str]] = {}
  for start in range(0, len(train_like), args.queries_per_batch):
    found.update(exploration.candidates(train_like[start:start + args.queries_per_batch], {}))
    print(f"{PROG}: expert thoughts for {len(found)} of {len(queries)} queries", file=sys.stderr, flush=True)
  return found


def committee_view(committee: Committee, queries: Sequence[Query], candidates: dict[str, list[str]]
                   ) -> tuple[list[int], dict[str, Any]]:
  """The committee's winner per query, and each member's mean score of the winner against a random candidate."""
  verdicts = committee.judge([q.relevant[0] for q in queries], [candidates[q.query_id] for q in queries])
  view: dict[str, Any] = {"first_candidate_won": float(np.mean([v.winner == 0 for v in verdicts]))}
  for m, name in enumerate(committee.names):
    view[name] = {"chosen": float(np.mean([v.scores[m, v.winner] for v in verdicts])),
                  "random": float(np.mean([v.scores[m].mean() for v in verdicts]))}
  return [v.winner for v in verdicts], view


def format_table(sources: dict[str, Quality]) -> str:
  header = ["source", "thoughts", "words", "MiniLM cos", "in relevant", "new relevant words"]
  rows = [[name, f"{q.thoughts_per_query:.1f}", f"{q.words:.1f}", f"{q.minilm_cosine:.3f}",
           f"{q.share_in_relevant:.3f}", f"{q.new_relevant_words:.2f}"] for name, q in sources.items()]
  widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                             enumerate(zip(r, widths))) for r in [header] + rows)


def main(argv: Sequence[str]) -> dict[str, Any]:
  args = parse_args(argv)
  splits = load_splits(args)
  queries = load_queries(args, splits)
  prompts = options.make_prompt_builder(args, example_pool(args, splits))
  scored = {name: read_thoughts(path) for name, path in args.score.items()}
  for name, thoughts in scored.items():
    thoughts_file.check_covers(f"--score={name}={args.score[name]}", [q.query_id for q in queries], thoughts)
  earlier = read_thoughts(args.candidates_from) if args.candidates_from else None
  if earlier is not None:
    thoughts_file.check_covers(f"--candidates_from={args.candidates_from}", [q.query_id for q in queries], earlier)
  committee = options.make_committee(args)
  dense = next(m for m in committee.members if isinstance(m, DenseMember))
  candidates = ({q.query_id: earlier[q.query_id].texts for q in queries} if earlier is not None
                else expert_candidates(args, queries, prompts))
  missing = [q.query_id for q in queries if q.query_id not in candidates]
  if missing:
    raise ValueError(f"the expert answered every candidate of {len(missing)} queries with empty text "
                     f"(first: {missing[0]!r})")
  winners, view = committee_view(committee, queries, candidates)
  oracle = [" ".join(q.relevant[0].split()[:args.oracle_words]) for q in queries]
  written = {"expert": [[candidates[q.query_id][0]] for q in queries],
             "expert-chosen": [[candidates[q.query_id][w]] for q, w in zip(queries, winners)],
             "oracle": [[text] for text in oracle]}
  storage.makedirs(args.out)
  write_thoughts(storage.join(args.out, "candidates.thoughts.jsonl"),
                 {q.query_id: QueryThoughts(q.query, candidates[q.query_id]) for q in queries})
  for name, thoughts in written.items():
    write_thoughts(storage.join(args.out, f"{name}.thoughts.jsonl"),
                   {q.query_id: QueryThoughts(q.query, t) for q, t in zip(queries, thoughts)})
  sources = {"query": [[q.query] for q in queries], "expert": written["expert"],
             "expert-random": [candidates[q.query_id] for q in queries],
             "expert-chosen": written["expert-chosen"], "oracle": written["oracle"],
             **{name: [thoughts[q.query_id].texts for q in queries] for name, thoughts in scored.items()}}
  measured = {name: quality(queries, thoughts, dense) for name, thoughts in sources.items()}
  print(format_table(measured))
  result = {"command": " ".join([PROG, *argv]), "queries": len(queries), "k": args.k,
            "candidates_from": args.candidates_from or None,
            "sources": {name: dataclasses.asdict(q) for name, q in measured.items()}, "committee": view}
  atomic_write_json(storage.join(args.out, "quality.json"), result)
  return result


def cli() -> None:
  """`python -m data_tools.diagnose`: bad input and an unavailable expert end it with one line and exit status 1."""
  shards.run_command(PROG, main, sys.argv[1:], options.EXPERT_ERRORS)


if __name__ == "__main__":
  cli()
