"""BM25 and sentence-encoder baselines on a BEIR split; `python -m o1jax.eval.baselines` prints them side by side.

  python -m o1jax.eval.baselines --dataset=../shared/data/beir-scifact --split=test [--out=DIR]

Every option is checked before the dataset or a model loads; the table is printed before `--out` is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from o1jax.data.readers import load_beir
from o1jax.eval import baselines, evaluation


def main(argv: Sequence[str]) -> dict[str, evaluation.Evaluation]:
  parser = argparse.ArgumentParser(prog="python -m o1jax.eval.baselines", description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl[.gz], queries.jsonl, qrels/)")
  parser.add_argument("--split", default="test")
  parser.add_argument("--out", help="directory for run files and metrics JSON")
  parser.add_argument("--model", default=None, help="sentence-transformers model (default: offline all-MiniLM-L6-v2)")
  parser.add_argument("--search", default="auto", choices=["auto", "exact", "scann"])
  parser.add_argument("--k", type=int, default=1000)
  args = parser.parse_args(argv)
  if not os.path.isdir(args.dataset):
    raise ValueError(f"--dataset={args.dataset}: no such directory")
  if args.k < 1:
    raise ValueError(f"--k={args.k}: must be >= 1")
  try:
    baselines.check_sentence_model(args.model)
  except ValueError as e:
    raise ValueError(f"--model: {e}") from None
  if args.out is not None:
    evaluation.check_output_directory("--out", args.out)
  dataset = load_beir(args.dataset, args.split)
  results = {"BM25": baselines.evaluate_bm25(dataset, args.k)}
  name = "MiniLM-L6-v2" if args.model is None else os.path.basename(args.model.rstrip("/"))
  results[name] = baselines.evaluate_sentence_encoder(dataset, args.model, args.k, args.search)
  print(evaluation.format_table({label: e.metrics for label, e in results.items()}))
  if args.out:
    try:
      for label, result in results.items():
        evaluation.write_evaluation(args.out, label, result)
    except OSError as e:
      raise OSError(f"--out={args.out}: writing the results failed ({e}); the table above is complete") from e
  return results


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
