"""`python -m o1jax.eval.mteb`: mteb's evaluation of an o1jax checkpoint, on mteb tasks or local BEIR directories.

  python -m o1jax.eval.mteb --checkpoint=PATH --tasks=SciFact,NFCorpus [--think=3|off] [--out=DIR]
  python -m o1jax.eval.mteb --checkpoint=PATH --dataset=DIR [--dataset=DIR ...] [--split=test] [--think=off]

PATH is an exported Hugging Face directory or an o1jax checkpoint directory. `--tasks` are mteb task names (mteb
downloads their data from the Hugging Face hub); `--dataset` BEIR directories become local retrieval tasks named
after the directory (nothing downloaded). Queries are embedded with `--think` sampled thoughts each (seeded by
`--seed`) or none (`off`, the default), documents with the document template (`O1jaxEncoder`). Prints each task's
main score (nDCG@10 for retrieval) per split and subset; `--out` gets `summary.json` with every score mteb computed.
Every option is checked and every task's data loaded before the model loads; the table is printed before `--out`
is written.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any, Sequence

import mteb

from o1jax import storage
from o1jax.data.readers import load_beir
from o1jax.eval import evaluation, retriever_eval
from o1jax.eval.mteb import local_task
from o1jax.eval.mteb_encoder import O1jaxEncoder
from o1jax.files import atomic_write_json
from o1jax.model.config import COMPUTE_DTYPES
from o1jax.retrieval.retriever import EVAL_LENGTHS, Sampling
from o1jax.templates import DOC_TEMPLATE_TOKENS

Scores = dict[str, dict[str, list[dict[str, Any]]]]  # {task: {split: [mteb's scores of each subset]}}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m o1jax.eval.mteb", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="exported Hugging Face directory or o1jax checkpoint directory")
  p.add_argument("--tasks", default="", help="comma-separated mteb task names (data from the Hugging Face hub)")
  p.add_argument("--dataset", action="append", default=[], help="repeatable: a BEIR directory, as a local task")
  p.add_argument("--split", default="test", help="the qrels split of --dataset directories")
  p.add_argument("--think", type=retriever_eval.think_option, default=0,
                 help="thoughts per query, or 'off' (the default)")
  retriever_eval.add_sampling_options(p)
  p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same thoughts")
  p.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES)
  p.add_argument("--doc_tokens", type=int, default=EVAL_LENGTHS.doc,
                 help="document length in tokens, <emb> included (METHOD: 512)")
  p.add_argument("--batch_size", type=int, default=32, help="mteb's batch size (each encode call is embedded whole)")
  p.add_argument("--cache_dir", default=None, help="document-embedding cache")
  p.add_argument("--out", help="directory for summary.json")
  return p


def check_args(args: argparse.Namespace) -> tuple[Sampling, list]:
  """Every option checked, and every task's data loaded, before the model loads: the thought sampling and the
  tasks. Raises ValueError naming the option, OSError when a task's data cannot be had."""
  if not os.path.isdir(args.checkpoint):
    raise ValueError(f"--checkpoint={args.checkpoint}: no such directory")
  names = [name.strip() for name in args.tasks.split(",") if name.strip()]
  if not names and not args.dataset:
    raise ValueError("--tasks, --dataset: no task (give mteb task names or BEIR directories)")
  if args.doc_tokens < DOC_TEMPLATE_TOKENS:
    raise ValueError(f"--doc_tokens={args.doc_tokens}: must be >= {DOC_TEMPLATE_TOKENS} ([BOS] text <emb>)")
  if args.batch_size < 1:
    raise ValueError(f"--batch_size={args.batch_size}: must be >= 1")
  if not 0 <= args.seed < 2**32:
    raise ValueError(f"--seed={args.seed}: must be in [0, 2**32)")
  sampling = retriever_eval.sampling_from(args)
  for directory in args.dataset:
    if not os.path.isdir(directory):
      raise ValueError(f"--dataset={directory}: no such directory")
  if args.cache_dir is not None:
    evaluation.check_output_directory("--cache_dir", args.cache_dir)
  if args.out is not None:
    evaluation.check_output_directory("--out", args.out)
  try:
    tasks = list(mteb.get_tasks(tasks=names)) if names else []
  except KeyError as e:
    raise ValueError(f"--tasks={args.tasks}: {str(e.args[0]).removeprefix('KeyError: ')}") from None
  tasks += [local_task(pathlib.Path(d).resolve().name, load_beir(d, args.split), args.split) for d in args.dataset]
  if len({task.metadata.name for task in tasks}) < len(tasks):
    raise ValueError("--tasks, --dataset: two tasks have the same name")
  for task in tasks:
    try:
      task.load_data()
    except OSError as e:
      raise OSError(f"--tasks: {task.metadata.name}: its data cannot be loaded ({e})") from e
  return sampling, tasks


def table_rows(scores: Scores, main_scores: dict[str, str]) -> dict[str, dict[str, float]]:
  """One row per task, split and subset (named only where a task has several): its main score, by name."""
  rows = {}
  for task, splits in scores.items():
    several = len(splits) > 1 or any(len(subsets) > 1 for subsets in splits.values())
    for split, subsets in splits.items():
      for subset in subsets:
        label = f"{task} {split}/{subset['hf_subset']}" if several else task
        rows[label] = {main_scores[task]: subset["main_score"]}
  return rows


def main(argv: Sequence[str]) -> Scores:
  args = parser().parse_args(argv)
  sampling, tasks = check_args(args)
  encoder = O1jaxEncoder.from_pretrained(args.checkpoint, dtype=args.dtype, doc_tokens=args.doc_tokens,
                                         think=args.think, sampling=sampling, seed=args.seed, cache_dir=args.cache_dir)
  result = mteb.evaluate(encoder, tasks, cache=None, co2_tracker=False, encode_kwargs={"batch_size": args.batch_size})
  scores = {r.task_name: r.scores for r in result.task_results}
  # The table first: if writing fails, the hours behind these numbers are not lost with it.
  print(evaluation.format_table(table_rows(scores, {task.metadata.name: task.metadata.main_score for task in tasks})))
  if args.out:
    meta = encoder.mteb_model_meta
    summary = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
               "model": {"name": meta.name, "revision": meta.revision, "experiment": meta.experiment_kwargs},
               "scores": scores}
    try:
      atomic_write_json(storage.join(args.out, "summary.json"), summary)
    except OSError as e:
      raise OSError(f"--out={args.out}: writing the results failed ({e}); the table above is complete") from e
  return scores


def cli() -> None:
  """`python -m o1jax.eval.mteb`: one line and exit 1 on bad input."""
  try:
    main(sys.argv[1:])
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli()
