"""`python -m o1jax.eval`: an o1jax checkpoint with and without thinking next to BM25 and MiniLM, one table.

  python -m o1jax.eval --checkpoint=PATH --dataset=../shared/data/beir-scifact [--split=test] [--think=3|off]
      [--baselines=bm25,minilm] [--out=DIR] [--max_queries=N] [--search=auto|exact|scann] [--drop_self_hits]
      [--doc_tokens=512]

PATH is an exported Hugging Face directory or an o1jax checkpoint directory. Metrics are trec_eval's (through
pytrec_eval) over every judged query: nDCG@10, MRR@10 (run cut at 10), Recall@100, Recall@1000 of the top-k
(default 1000) run. `--out` gets a TREC run file and a metrics JSON (means and per-query values) per system and
`summary.json`; `--per_query` also prints every query's values. Document embeddings are cached on disk
(`--cache_dir`, default $O1JAX_CACHE or ~/.cache/o1jax), keyed by checkpoint, corpus and settings.
Every option is checked before the dataset or any model loads; the table is printed before `--out` is written.
With `--think_url=http://host:8000/v1 --think_model=NAME [--api_key_env=VAR]` the thoughts come from an
OpenAI-compatible completions server (vLLM, ...) serving the exported model; embedding stays local.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from typing import Sequence

from o1jax.data.readers import BeirDataset, load_beir
from o1jax.eval import baselines, evaluation, retriever_eval
from o1jax.eval.metrics import DEFAULT_MEASURES
from o1jax.files import atomic_write_json
from o1jax.http_json import RequestError
from o1jax.retrieval.remote_generator import CompletionsGenerator
from o1jax.retrieval.retriever import EVAL_LENGTHS, Retriever, Sampling
from o1jax.templates import DOC_TEMPLATE_TOKENS


def _think(value: str) -> int:
  if value == "off":
    return 0
  try:
    k = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number of thoughts or 'off', got {value!r}") from None
  if k < 0:
    raise argparse.ArgumentTypeError(f"expected >= 0 thoughts, got {k}")
  return k


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m o1jax.eval", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="exported Hugging Face directory or o1jax checkpoint directory")
  p.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl[.gz], queries.jsonl, qrels/)")
  p.add_argument("--split", default="test")
  p.add_argument("--think", type=_think, default=3, help="thoughts per query (METHOD: 3), or 'off'")
  p.add_argument("--temperature", type=float, default=Sampling.temperature)
  p.add_argument("--top_p", type=float, default=Sampling.top_p)
  p.add_argument("--max_new_tokens", type=int, default=Sampling.max_new_tokens)
  p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same thoughts")
  p.add_argument("--baselines", default="bm25,minilm",
                 help="comma-separated: bm25, minilm, or a sentence-transformers model directory; '' for none")
  p.add_argument("--out", help="directory for TREC run files and metrics JSON")
  p.add_argument("--max_queries", type=int, default=0, help="evaluate only the first N judged queries (0 = all)")
  p.add_argument("--search", default="auto", choices=["auto", "exact", "scann"])
  p.add_argument("--k", type=int, default=1000, help="documents retrieved per query")
  p.add_argument("--drop_self_hits", action="store_true", help="never retrieve a doc whose id is the query id")
  p.add_argument("--per_query", action="store_true", help="print every query's metrics")
  p.add_argument("--cache_dir", default=None, help="document-embedding cache")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--doc_tokens", type=int, default=EVAL_LENGTHS.doc,
                 help="o1jax document length in tokens, <emb> included (METHOD: 512)")
  p.add_argument("--think_url", default=None,
                 help="OpenAI-compatible server that writes the thoughts, e.g. http://127.0.0.1:8000/v1")
  p.add_argument("--think_model", default=None, help="the model name the --think_url server serves")
  p.add_argument("--api_key_env", default=None, help="environment variable holding the --think_url server's key")
  return p


def _sentence_encoder(dataset: BeirDataset, model: str | None, args: argparse.Namespace) -> evaluation.Evaluation:
  return baselines.evaluate_sentence_encoder(dataset, model, args.k, args.search, cache_dir=args.cache_dir,
                                             drop_self_hits=args.drop_self_hits)


def _baseline_plan(spec: str, taken: list[str]) -> dict[str, str]:
  """{table label: bm25 | minilm | model directory} for `--baselines`, every name checked."""
  plan: dict[str, str] = {}
  for name in [b.strip() for b in spec.split(",") if b.strip()]:
    if name == "bm25":
      label = "BM25"
    elif name == "minilm" or os.path.isdir(name):
      try:
        baselines.check_sentence_model(None if name == "minilm" else name)
      except ValueError as e:
        raise ValueError(f"--baselines: {e}") from None
      label = "MiniLM-L6-v2" if name == "minilm" else os.path.basename(name.rstrip("/"))
    else:
      raise ValueError(f"--baselines: {name!r} is neither bm25, minilm nor a sentence-transformers directory")
    if label in taken or label in plan:
      raise ValueError(f"--baselines: {name!r} gives the table row {label!r} twice")
    plan[label] = name
  return plan


def check_args(args: argparse.Namespace) -> tuple[Sampling, dict[str, str]]:
  """Every option checked before anything loads: the thought sampling and the baselines' {label: name}.
  Raises ValueError naming the option."""
  for option, value in (("--checkpoint", args.checkpoint), ("--dataset", args.dataset)):
    if not os.path.isdir(value):
      raise ValueError(f"{option}={value}: no such directory")
  if args.k < 1:
    raise ValueError(f"--k={args.k}: must be >= 1")
  if args.max_queries < 0:
    raise ValueError(f"--max_queries={args.max_queries}: must be >= 0 (0 = all)")
  if args.doc_tokens < DOC_TEMPLATE_TOKENS:
    raise ValueError(f"--doc_tokens={args.doc_tokens}: must be >= {DOC_TEMPLATE_TOKENS} ([BOS] text <emb>)")
  # jax keys hold 32 bits: a larger or negative seed would silently alias another seed's thoughts.
  if not 0 <= args.seed < 2**32:
    raise ValueError(f"--seed={args.seed}: must be in [0, 2**32)")
  try:
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
  except ValueError as e:
    raise ValueError(f"--{e}") from None  # Sampling's messages start with the field name, the option's name
  if (args.think_url is None) != (args.think_model is None):
    raise ValueError("--think_url and --think_model go together (the server and the model name it serves)")
  if args.api_key_env is not None and args.think_url is None:
    raise ValueError("--api_key_env is the key of a --think_url server; there is none")
  if args.api_key_env is not None and not os.environ.get(args.api_key_env):
    raise ValueError(f"--api_key_env={args.api_key_env}: that environment variable is not set")
  plan = _baseline_plan(args.baselines, [_label(think) for think in _thinks(args)])
  if args.cache_dir is not None:
    evaluation.check_output_directory("--cache_dir", args.cache_dir)
  if args.out is not None:
    evaluation.check_output_directory("--out", args.out)
  return sampling, plan


def _thinks(args: argparse.Namespace) -> list[int]:
  return ([args.think] if args.think else []) + [0]


def _label(think: int) -> str:
  return f"o1jax think={think}" if think else "o1jax no-think"


def evaluate_all(args: argparse.Namespace) -> dict[str, evaluation.Evaluation]:
  """Every requested system on the dataset, in table order."""
  sampling, plan = check_args(args)
  dataset = retriever_eval.first_queries(load_beir(args.dataset, args.split), args.max_queries)
  lengths = dataclasses.replace(EVAL_LENGTHS, doc=args.doc_tokens)
  generator = None
  if args.think_url is not None:
    generator = CompletionsGenerator(args.think_url, args.think_model, api_key_env=args.api_key_env)
  retriever = Retriever.from_pretrained(args.checkpoint, dtype=args.dtype, lengths=lengths, generator=generator)
  retriever_eval.index_corpus(retriever, dataset, args.search, args.k, args.cache_dir)
  results = {}
  for think in _thinks(args):
    results[_label(think)] = retriever_eval.evaluate(retriever, dataset, think, args.k, sampling, args.seed,
                                                     args.drop_self_hits)
  for label, name in plan.items():
    if name == "bm25":
      results[label] = baselines.evaluate_bm25(dataset, args.k, drop_self_hits=args.drop_self_hits)
    else:
      results[label] = _sentence_encoder(dataset, None if name == "minilm" else name, args)
  return results


def _per_query_lines(results: dict[str, evaluation.Evaluation]) -> list[str]:
  lines = ["system\tquery\t" + "\t".join(DEFAULT_MEASURES)]
  for label, result in results.items():
    for qid in result.per_query[DEFAULT_MEASURES[0]]:
      values = "\t".join(f"{result.per_query[m][qid]:.4f}" for m in DEFAULT_MEASURES)
      lines.append(f"{label}\t{qid}\t{values}")
  return lines


def main(argv: Sequence[str]) -> dict[str, evaluation.Evaluation]:
  args = parser().parse_args(argv)
  results = evaluate_all(args)
  # The table first: if writing fails, the hours behind these numbers are not lost with it.
  print(evaluation.format_table({label: e.metrics for label, e in results.items()}))
  if args.per_query:
    print("\n".join(_per_query_lines(results)))
  if args.out:
    try:
      for label, result in results.items():
        evaluation.write_evaluation(args.out, label, result)
      summary = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
                 "metrics": {label: e.metrics for label, e in results.items()}}
      atomic_write_json(pathlib.Path(args.out) / "summary.json", summary)
    except OSError as e:
      raise OSError(f"--out={args.out}: writing the results failed ({e}); the table above is complete") from e
  return results


def cli() -> None:
  """`python -m o1jax.eval` and the `o1jax-eval` command: one line and exit 1 on bad input."""
  try:
    main(sys.argv[1:])
  except (ValueError, OSError, RequestError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli()
