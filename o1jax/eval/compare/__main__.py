"""`python -m o1jax.eval.compare`: two TREC run files compared query by query on one trec_eval measure.

  python -m o1jax.eval.compare RUN_A RUN_B --qrels=QRELS [--measure=ndcg@10] [--names=a,b] [--json=PATH]
      [--order=score|rank] [--permutations=100000] [--seed=0] [--confidence=0.95]

QRELS is a TREC (qid iter docid rel) or BEIR (query-id corpus-id score, with header) qrels file. The measure is any
that `python -m o1jax.eval` knows (`ndcg@10`, `mrr@10`, `recall@100`, or a trec_eval name such as `ndcg_cut_10`,
`map`, `P_5`). The runs are compared on the judged queries they hold; both must hold the same ones. Run queries
without judgements are left out, as trec_eval leaves them out. RUN_A or RUN_B may name several runs of one system
joined by commas (`a-seed0.trec,a-seed1.trec`: replicates, e.g. training seeds): each query's value is then their
mean, so the test is on the system averaged over its replicates (which must hold the same judged queries). Prints
wins / ties / losses of A against B, the mean difference A - B with its confidence interval (t distribution), the
paired randomization test p-value and the paired t-test; `--json` also writes them, with the command that produced
them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shlex
import sys
from typing import Sequence

import numpy as np

from o1jax.data.readers import read_qrels
from o1jax.eval import metrics
from o1jax.eval.compare import Comparison, check_same_queries, compare
from o1jax.eval.run_file import read_run
from o1jax.files import atomic_write_json


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m o1jax.eval.compare", description=__doc__.splitlines()[0])
  p.add_argument("run_a", metavar="RUN_A", help="TREC run file (.gz ok) of system A, or replicates joined by commas")
  p.add_argument("run_b", metavar="RUN_B", help="TREC run file (.gz ok) of system B, or replicates joined by commas")
  p.add_argument("--qrels", required=True, help="TREC or BEIR qrels file")
  p.add_argument("--measure", default="ndcg@10", help="trec_eval measure (default ndcg@10 = ndcg_cut_10)")
  p.add_argument("--names", default=None, help="'a,b': the two systems' names (default: the file names)")
  p.add_argument("--json", default=None, help="also write the result as JSON here")
  p.add_argument("--permutations", type=int, default=100_000,
                 help="random sign flips for the randomization test (exact when 2^queries is not more)")
  p.add_argument("--order", default="score", choices=["score", "rank"],
                 help="rank a run by its scores (trec_eval) or by its rank column (runs with rounded scores)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random sign flips")
  p.add_argument("--confidence", type=float, default=0.95, help="level of the confidence interval")
  return p


def _run_name(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".gz", ".trec", ".run", ".txt"):
    name = name.removesuffix(suffix)
  return name


def replicates(runs: str) -> list[str]:
  """The run files RUN names: itself when it is a file, else its comma-separated parts."""
  return [runs] if os.path.isfile(runs) else runs.split(",")


def check_args(args: argparse.Namespace) -> tuple[str, str]:
  """Every option checked before any file is read; returns the two systems' names."""
  named = [(option, path) for option, runs in (("RUN_A", args.run_a), ("RUN_B", args.run_b))
           for path in replicates(runs)]
  for option, path in (*named, ("--qrels", args.qrels)):
    if not os.path.isfile(path):
      raise ValueError(f"{option}={path}: {'not a file' if os.path.exists(path) else 'no such file'}")
  try:
    metrics.trec_name(args.measure)
  except ValueError as e:
    raise ValueError(f"--measure: {e}") from None
  if args.names is None:
    names = tuple(_run_name(runs) if len(replicates(runs)) == 1 else
                  f"mean of {len(replicates(runs))} ({', '.join(map(_run_name, replicates(runs)))})"
                  for runs in (args.run_a, args.run_b))
    if names[0] == names[1]:
      names = (args.run_a, args.run_b)
  else:
    names = tuple(n.strip() for n in args.names.split(","))
    if len(names) != 2 or not all(names) or names[0] == names[1]:
      raise ValueError(f"--names={args.names}: expected two different non-empty names, 'a,b'")
  if not 0 < args.confidence < 1:
    raise ValueError(f"--confidence={args.confidence}: must be in (0, 1)")
  if args.permutations < 1:
    raise ValueError(f"--permutations={args.permutations}: must be >= 1")
  if args.json is not None:
    parent = os.path.dirname(os.path.abspath(args.json))
    if os.path.isdir(args.json) or (os.path.exists(parent) and not os.path.isdir(parent)):
      raise ValueError(f"--json={args.json}: cannot be written (a directory, or under a file)")
  return names


def per_query(args: argparse.Namespace, names: tuple[str, str]) -> tuple[dict[str, float], dict[str, float],
                                                                        list[str]]:
  """Both systems' values of the measure on the judged queries their runs hold (each query's mean over a system's
  replicates), and notes on the queries left out."""
  qrels = read_qrels(args.qrels)
  if not qrels:
    raise ValueError(f"--qrels={args.qrels}: no judgements")
  runs = []  # (side, path, run): every replicate of A, then of B
  for side, runs_arg in enumerate((args.run_a, args.run_b)):
    for path in replicates(runs_arg):
      run = read_run(path, args.order)
      if not run:
        raise ValueError(f"{names[side]}: {path} holds no results")
      runs.append((side, path, run))
  # A run is named by its system's name, or by its file where a system has several.
  label = lambda side, path: names[side] if len(runs) == 2 else path
  judged = [{q: docs for q, docs in run.items() if q in qrels} for _, _, run in runs]
  for (side, path, _), queries in zip(runs[1:], judged[1:]):
    check_same_queries(judged[0], queries, (label(*runs[0][:2]), label(side, path)))
  if not judged[0]:
    raise ValueError(f"no query of {names[0]} or {names[1]} is judged in {args.qrels}: wrong --qrels?")
  notes = []
  for side, path, run in runs:
    if len(run) > len(judged[0]):
      notes.append(f"{len(run) - len(judged[0])} queries of {label(side, path)} have no judgements and are left out "
                   "(as trec_eval does)")
  if len(qrels) > len(judged[0]):
    notes.append(f"{len(qrels) - len(judged[0])} judged queries are in neither run and are left out")
  compared = {q: qrels[q] for q in judged[0]}
  values = [metrics.evaluate_per_query(compared, run, [args.measure])[args.measure] for run in judged]
  systems = [{q: float(np.mean([v[q] for (owner, _, _), v in zip(runs, values) if owner == side])) for q in compared}
             for side in (0, 1)]
  return systems[0], systems[1], notes


def format_comparison(result: Comparison) -> str:
  a, b = result.names
  width = max(len(a), len(b), len("system"))
  lines = [f"{'system':<{width}}  {result.measure:>10}",
           f"{a:<{width}}  {result.mean_a:>10.4f}",
           f"{b:<{width}}  {result.mean_b:>10.4f}",
           f"{a} vs {b} on {result.queries} queries: wins {result.wins}, ties {result.ties}, losses {result.losses}"]
  level = f"{result.confidence:.0%}"
  if result.ci_low is None:
    lines.append(f"mean difference {result.mean_difference:+.4f} (every query's difference is the same: no "
                 f"{level} interval)")
  else:
    half = (result.ci_high - result.ci_low) / 2
    lines.append(f"mean difference {result.mean_difference:+.4f} ± {half:.4f} ({level} CI {result.ci_low:+.4f} to "
                 f"{result.ci_high:+.4f})")
  how = (f"exact, all {result.permutations:,} sign flips" if result.randomization_exact
         else f"{result.permutations:,} random sign flips, seed {result.seed}")
  lines.append(f"paired randomization test: p = {result.randomization_pvalue:.4f} ({how})")
  if result.t_pvalue is None:
    lines.append("paired t-test: undefined (every query's difference is the same)")
  else:
    lines.append(f"paired t-test: t = {result.t_statistic:.3f} (df {result.queries - 1}), p = {result.t_pvalue:.4f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> Comparison:
  args = parser().parse_args(argv)
  names = check_args(args)
  a, b, notes = per_query(args, names)
  result = compare(a, b, measure=args.measure, names=names, confidence=args.confidence,
                   permutations=args.permutations, seed=args.seed)
  print(format_comparison(result))
  for note in notes:
    print(f"note: {note}")
  if args.json is not None:
    # The command as typed, so a report quoting the p-value can say how to reproduce it.
    payload = {**dataclasses.asdict(result),
               "runs": [[os.path.abspath(p) for p in replicates(r)] if len(replicates(r)) > 1 else os.path.abspath(r)
                        for r in (args.run_a, args.run_b)],
               "qrels": os.path.abspath(args.qrels), "notes": notes,
               "command": shlex.join(["python", "-m", "o1jax.eval.compare", *argv])}
    try:
      atomic_write_json(pathlib.Path(args.json), payload)
    except OSError as e:
      raise OSError(f"--json={args.json}: writing failed ({e}); the result above is complete") from e
  return result


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
