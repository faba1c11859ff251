"""A small BEIR directory cut from a large one, to check a recipe end to end in minutes.

  python -m data_tools.subset --dataset=DIR --out=DIR --queries=train:10 --queries=test:4 [--other_docs=30]

Keeps the first N judged queries of each named split (qrels order) with their judgements, every document judged for
them, and the first `--other_docs` other documents of the corpus (corpus order) as distractors; writes
corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv in the BEIR layout the recipe, `o1jax.eval` and the data tools
read. The same input and options give the same files. `--out` must not exist yet: nothing is overwritten.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import sys

from data_tools import shards
from o1jax import storage
from o1jax.data.readers import BeirDataset, Doc, load_beir_splits
from o1jax.files import atomic_write_text

PROG = "python -m data_tools.subset"


def split_count(value: str) -> tuple[str, int]:
  split, sep, count = value.partition(":")
  if not sep or not split or not count.isdigit() or int(count) < 1:
    raise argparse.ArgumentTypeError(f"expected SPLIT:N with N >= 1 queries, got {value!r}")
  return split, int(count)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl[.gz], queries.jsonl, qrels/)")
  p.add_argument("--out", required=True, help="the new BEIR directory (must not exist)")
  p.add_argument("--queries", type=split_count, action="append", required=True,
                 help="repeatable SPLIT:N: the first N judged queries of qrels/SPLIT.tsv")
  p.add_argument("--other_docs", type=int, default=30, help="unjudged documents kept as distractors")
  args = p.parse_args(argv)
  splits = [split for split, _ in args.queries]
  if len(set(splits)) != len(splits):
    p.error(f"--queries: a split is named twice ({', '.join(splits)})")
  if args.other_docs < 0:
    p.error(f"--other_docs={args.other_docs}: must be >= 0")
  if storage.exists(args.out):
    p.error(f"--out={args.out}: already exists (nothing is overwritten)")
  return args


def cut(datasets: dict[str, BeirDataset], counts: dict[str, int], other_docs: int
        ) -> tuple[dict[str, Doc], dict[str, str], dict[str, dict[str, dict[str, int]]]]:
  """(corpus, queries, {split: qrels}) of the subset of `datasets` (one per split, sharing one corpus)."""
  qrels = {split: dict(list(d.qrels.items())[:counts[split]]) for split, d in datasets.items()}
  corpus = next(iter(datasets.values())).corpus
  judged = {doc for split in qrels.values() for grades in split.values() for doc in grades}
  kept = [d for d in corpus if d in judged] + [d for d in corpus if d not in judged][:other_docs]
  queries = {q: datasets[split].queries[q] for split, judgements in qrels.items() for q in judgements}
  return {d: corpus[d] for d in kept}, queries, qrels


def main(argv: Sequence[str]) -> dict[str, int]:
  args = parse_args(argv)
  counts = dict(args.queries)
  datasets = load_beir_splits(args.dataset, list(counts))
  for split, count in counts.items():
    if len(datasets[split].qrels) < count:
      raise ValueError(f"--queries={split}:{count}: qrels/{split}.tsv judges only {len(datasets[split].qrels)} queries")
  corpus, queries, qrels = cut(datasets, counts, args.other_docs)
  storage.makedirs(storage.join(args.out, "qrels"))
  atomic_write_text(storage.join(args.out, "corpus.jsonl"), "".join(
      json.dumps({"_id": d, "title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n"
      for d, doc in corpus.items()))
  atomic_write_text(storage.join(args.out, "queries.jsonl"), "".join(
      json.dumps({"_id": q, "text": text}, ensure_ascii=False) + "\n" for q, text in queries.items()))
  for split, judgements in qrels.items():
    lines = [f"{q}\t{d}\t{grade}\n" for q, grades in judgements.items() for d, grade in grades.items()]
    atomic_write_text(storage.join(args.out, "qrels", f"{split}.tsv"), "query-id\tcorpus-id\tscore\n" + "".join(lines))
  summary = {"documents": len(corpus), "queries": len(queries)}
  print(f"{PROG}: wrote {args.out}: {len(corpus)} documents, "
        + ", ".join(f"{split} {len(j)} queries" for split, j in qrels.items()), file=sys.stderr)
  return summary


def cli() -> None:
  """`python -m data_tools.subset`: bad input ends it with one line and exit status 1."""
  shards.run_command(PROG, main, sys.argv[1:])


if __name__ == "__main__":
  cli()
