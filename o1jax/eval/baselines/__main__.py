"""BM25 and sentence-encoder baselines on a BEIR split; `python -m o1jax.eval.baselines` prints them side by side.

  python -m o1jax.eval.baselines --dataset=../shared/data/beir-scifact --split=test [--out=DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from o1jax.data.readers import load_beir
from o1jax.eval import baselines, evaluation


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
  results = {"BM25": baselines.evaluate_bm25(dataset, args.k)}
  name = "MiniLM-L6-v2" if args.model is None else os.path.basename(args.model.rstrip("/"))
  results[name] = baselines.evaluate_sentence_encoder(dataset, args.model, args.k, args.search)
  if args.out:
    for label, result in results.items():
      evaluation.write_evaluation(args.out, label, result)
  print(evaluation.format_table({label: e.metrics for label, e in results.items()}))


if __name__ == "__main__":
  main(sys.argv[1:])
