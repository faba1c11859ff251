"""`python -m o1jax.eval`: an o1jax checkpoint with and without thinking next to BM25 and MiniLM, on one or several
datasets, one table.

  python -m o1jax.eval --checkpoint=PATH --dataset=DATASET [--dataset=DATASET ...] [--split=test] [--suite=SUITE]
      [--think=3|off] [--baselines=bm25,minilm] [--out=DIR] [--max_queries=N] [--search=auto|exact|scann]
      [--drop_self_hits] [--doc_tokens=512] [--thoughts_from=NAME=FILE ...]
  python -m o1jax.eval --checkpoint=PATH --corpus=FILE --queries=FILE --qrels=FILE [--name=NAME] [--suite=SUITE] ...

PATH is an exported Hugging Face directory or an o1jax checkpoint directory. DATASET is a BEIR directory, `NAME=DIR`
or `NAME=corpus:FILE,queries:FILE,qrels:FILE`, with optional `,split:S` (directories) and `,suite:S`
(see `dataset_spec`); `--corpus/--queries/--qrels` add one dataset of loose files (jsonl or tsv: MS MARCO's
collection.tsv and queries, TREC topics; qrels BEIR tsv or TREC). Each dataset's suite picks its measures
(`suites`): beir nDCG@10, MRR@10, Recall@100, Recall@1000; dl (TREC DL) nDCG@10, and MRR@10 and Recall@1000 at
relevance >= 2; msmarco (MS MARCO dev) MRR@10, Recall@1000. A suite is `,suite:S`, else `--suite`, else guessed
from the dataset's name (dl19, dl20, trec-dl* -> dl; msmarco* -> msmarco; else beir).

Metrics are trec_eval's (through pytrec_eval) over every judged query of the top-k (default 1000) run. The table
has one row per system and one column per measure; with several datasets, one column per (dataset, measure) and
the average over datasets of each one's headline measure (the first of its suite). `--out` gets, per dataset and
system, a TREC run file, a metrics JSON (means and per-query values) and, for systems that think,
`<system>.thoughts.jsonl` (query id -> the thoughts it was embedded with, as text and token ids); with several
datasets in `--out/<NAME>/`; and `summary.json` (the table's numbers and each dataset's suite and source).
`--per_query` also prints every query's values. Document embeddings are cached on disk (`--cache_dir`, default
$O1JAX_CACHE or ~/.cache/o1jax), keyed by checkpoint, corpus and settings. Every option is checked before any
dataset or model loads; every dataset is read before the model loads; the table is printed before `--out` is
written. With `--think_url=http://host:8000/v1 --think_model=NAME [--api_key_env=VAR]` the thoughts come from an
OpenAI-compatible completions server (vLLM, ...) serving the exported model; embedding stays local.
`--thoughts_from=NAME=FILE` adds the row `o1jax thoughts=NAME`: the model embeds every query with the thoughts FILE
gives it instead of its own (written by another expert, or a relevant document as an oracle; `thoughts_file`), which
tells whether better thoughts would help this embedding.
"""
from __future__ import annotations

from o1jax import host_allocator

if __name__ == "__main__":  # before jax, TensorFlow and PyTorch start their threads and allocate
  host_allocator.reexec_on_cpu()

import argparse
import dataclasses
import os
import sys
from typing import Sequence

import numpy as np

from o1jax import storage
from o1jax.data.readers import BeirDataset
from o1jax.eval import baselines, dataset_spec, evaluation, retriever_eval, suites, thoughts_file
from o1jax.eval.thoughts_file import QueryThoughts
from o1jax.files import atomic_write_json
from o1jax.http_json import RequestError
from o1jax.model.config import COMPUTE_DTYPES
from o1jax.retrieval.remote_generator import CompletionsGenerator
from o1jax.retrieval.retriever import EVAL_LENGTHS, Retriever, Sampling
from o1jax.templates import DOC_TEMPLATE_TOKENS

Results = dict[str, dict[str, evaluation.Evaluation]]  # {dataset name: {system: its evaluation}}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m o1jax.eval", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="exported Hugging Face directory or o1jax checkpoint directory")
  p.add_argument("--dataset", action="append", default=[],
                 help="repeatable: DIR, NAME=DIR or NAME=corpus:FILE,queries:FILE,qrels:FILE; optional ,split:S "
                      "and ,suite:S (beir, dl, msmarco)")
  p.add_argument("--corpus", help="one more dataset from loose files: the corpus (jsonl, or tsv: pid, [title,] text)")
  p.add_argument("--queries", help="its queries (BEIR jsonl, or tsv: qid, text)")
  p.add_argument("--qrels", help="its judgements (BEIR tsv or TREC 'qid iter docid grade')")
  p.add_argument("--name", default="files", help="the name of the --corpus/--queries/--qrels dataset")
  p.add_argument("--split", default="test", help="the qrels split of directories that name none")
  p.add_argument("--suite", default=None, choices=list(suites.SUITES),
                 help="the suite of datasets that name none (default: guessed from each dataset's name)")
  p.add_argument("--think", type=retriever_eval.think_option, default=3, help="thoughts per query (METHOD: 3), or 'off'")
  retriever_eval.add_sampling_options(p)
  p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same thoughts")
  p.add_argument("--baselines", default="bm25,minilm",
                 help="comma-separated: bm25, minilm, or a sentence-transformers model directory; '' for none")
  p.add_argument("--out", help="directory for TREC run files, metrics JSON, thoughts and summary.json")
  p.add_argument("--max_queries", type=int, default=0,
                 help="evaluate only the first N judged queries of each dataset (0 = all)")
  p.add_argument("--search", default="auto", choices=["auto", "exact", "scann"])
  p.add_argument("--k", type=int, default=1000, help="documents retrieved per query")
  p.add_argument("--drop_self_hits", action="store_true", help="never retrieve a doc whose id is the query id")
  p.add_argument("--per_query", action="store_true", help="print every query's metrics")
  p.add_argument("--cache_dir", default=None, help="document-embedding cache")
  p.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES)
  p.add_argument("--doc_tokens", type=int, default=EVAL_LENGTHS.doc,
                 help="o1jax document length in tokens, <emb> included (METHOD: 512)")
  p.add_argument("--think_url", default=None,
                 help="OpenAI-compatible server that writes the thoughts, e.g. http://127.0.0.1:8000/v1")
  p.add_argument("--think_model", default=None, help="the model name the --think_url server serves")
  p.add_argument("--api_key_env", default=None, help="environment variable holding the --think_url server's key")
  p.add_argument("--thoughts_from", action="append", default=[], metavar="NAME=FILE",
                 help="repeatable: one more row, 'o1jax thoughts=NAME', embedding every query with the thoughts FILE "
                      "gives it (a thoughts.jsonl as --out writes, or text-only lines {query_id, thoughts}), each cut "
                      "to --max_new_tokens tokens; one dataset only")
  return p


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


def dataset_specs(args: argparse.Namespace) -> list[dataset_spec.DatasetSpec]:
  """The datasets of `--dataset` and `--corpus/--queries/--qrels`, in command-line order, every file checked."""
  specs = [dataset_spec.parse("--dataset", value, args.split, args.suite) for value in args.dataset]
  loose = {"--corpus": args.corpus, "--queries": args.queries, "--qrels": args.qrels}
  if any(loose.values()):
    missing = [option for option, value in loose.items() if not value]
    if missing:
      raise ValueError(f"{', '.join(missing)}: --corpus, --queries and --qrels go together")
    specs.append(dataset_spec.from_files(f"--name={args.name}", args.name, args.corpus, args.queries, args.qrels,
                                         default_suite=args.suite))
  if not specs:
    raise ValueError("--dataset: no dataset (give --dataset=DIR, or --corpus, --queries and --qrels)")
  seen: set[str] = set()
  for spec in specs:
    if spec.name in seen:
      raise ValueError(f"--dataset: two datasets are named {spec.name!r}; name them: --dataset=NAME=...")
    seen.add(spec.name)
  return specs


def check_args(args: argparse.Namespace) -> tuple[Sampling, dict[str, str], list[dataset_spec.DatasetSpec]]:
  """Every option checked before anything loads: the thought sampling, the baselines' {label: name} and the
  datasets. Raises ValueError naming the option."""
  if not storage.is_dir(args.checkpoint):
    raise ValueError(f"--checkpoint={args.checkpoint}: no such directory")
  specs = dataset_specs(args)
  if args.k < 1:
    raise ValueError(f"--k={args.k}: must be >= 1")
  if args.max_queries < 0:
    raise ValueError(f"--max_queries={args.max_queries}: must be >= 0 (0 = all)")
  if args.doc_tokens < DOC_TEMPLATE_TOKENS:
    raise ValueError(f"--doc_tokens={args.doc_tokens}: must be >= {DOC_TEMPLATE_TOKENS} ([BOS] text <emb>)")
  # jax keys hold 32 bits: a larger or negative seed would silently alias another seed's thoughts.
  if not 0 <= args.seed < 2**32:
    raise ValueError(f"--seed={args.seed}: must be in [0, 2**32)")
  sampling = retriever_eval.sampling_from(args)
  if (args.think_url is None) != (args.think_model is None):
    raise ValueError("--think_url and --think_model go together (the server and the model name it serves)")
  if args.api_key_env is not None and args.think_url is None:
    raise ValueError("--api_key_env is the key of a --think_url server; there is none")
  if args.api_key_env is not None and not os.environ.get(args.api_key_env):
    raise ValueError(f"--api_key_env={args.api_key_env}: that environment variable is not set")
  given = thoughts_file.named_files("--thoughts_from", args.thoughts_from)
  if given and len(specs) != 1:
    raise ValueError("--thoughts_from: query ids belong to one dataset; evaluate one dataset with it")
  plan = _baseline_plan(args.baselines, [_label(think) for think in _thinks(args)] + [_given_label(n) for n in given])
  if args.cache_dir is not None:
    evaluation.check_output_directory("--cache_dir", args.cache_dir)
  if args.out is not None:
    evaluation.check_output_directory("--out", args.out)
  return sampling, plan, specs, given


def _given_label(name: str) -> str:
  return f"o1jax thoughts={name}"


def _thinks(args: argparse.Namespace) -> list[int]:
  return ([args.think] if args.think else []) + [0]


def _label(think: int) -> str:
  return f"o1jax think={think}" if think else "o1jax no-think"


def _evaluate_dataset(retriever: Retriever, dataset: BeirDataset, suite: suites.Suite, plan: dict[str, str],
                      given: dict[str, dict[str, QueryThoughts]], sampling: Sampling,
                      args: argparse.Namespace) -> dict[str, evaluation.Evaluation]:
  """Every requested system on one dataset, in table order, scored with the dataset's suite."""
  retriever_eval.index_corpus(retriever, dataset, args.search, args.k, args.cache_dir)
  results = {}
  for think in _thinks(args):
    results[_label(think)] = retriever_eval.evaluate(retriever, dataset, think, args.k, sampling, args.seed,
                                                     args.drop_self_hits, suite.measures, suite.relevance_level)
  for name, thoughts in given.items():
    results[_given_label(name)] = retriever_eval.evaluate_given_thoughts(
        retriever, dataset, thoughts, sampling.max_new_tokens, args.k, args.drop_self_hits, suite.measures,
        suite.relevance_level)
  for label, name in plan.items():
    if name == "bm25":
      run = baselines.bm25_run(dataset, args.k, args.drop_self_hits)
    else:
      run = baselines.evaluate_sentence_encoder(dataset, None if name == "minilm" else name, args.k, args.search,
                                                cache_dir=args.cache_dir, drop_self_hits=args.drop_self_hits).run
    results[label] = evaluation.evaluate_run(dataset, run, suite.measures, suite.relevance_level)
  return results


def evaluate_all(args: argparse.Namespace) -> tuple[Results, list[dataset_spec.DatasetSpec]]:
  """Every requested system on every dataset: {dataset name: {system: evaluation}}, in command-line and table
  order, with the datasets' specs."""
  sampling, plan, specs, given_files = check_args(args)
  # Every dataset is read before the model loads: a malformed file stops the run before hours of work, not after.
  datasets = [retriever_eval.first_queries(spec.load(), args.max_queries) for spec in specs]
  given = {name: thoughts_file.read_thoughts(path) for name, path in given_files.items()}
  for name, thoughts in given.items():
    thoughts_file.check_covers(f"--thoughts_from={name}={given_files[name]}", list(datasets[0].queries), thoughts)
  lengths = dataclasses.replace(EVAL_LENGTHS, doc=args.doc_tokens)
  generator = None
  if args.think_url is not None:
    generator = CompletionsGenerator(args.think_url, args.think_model, api_key_env=args.api_key_env)
  retriever = Retriever.from_pretrained(args.checkpoint, dtype=args.dtype, lengths=lengths, generator=generator)
  results = {spec.name: _evaluate_dataset(retriever, dataset, spec.suite, plan, given, sampling, args)
             for spec, dataset in zip(specs, datasets)}
  return results, specs


def table_rows(results: Results, specs: Sequence[dataset_spec.DatasetSpec]) -> dict[str, dict[str, float]]:
  """{system: {column: value}}: one dataset's measures, or `NAME/measure` per dataset and `average/MEASURE`, the
  mean over datasets of each one's headline measure (`average/headline` when the suites' headlines differ)."""
  if len(results) == 1:
    return {system: e.metrics for system, e in next(iter(results.values())).items()}
  rows: dict[str, dict[str, float]] = {}
  for spec in specs:
    for system, e in results[spec.name].items():
      rows.setdefault(system, {}).update({f"{spec.name}/{m}": e.metrics[m] for m in spec.suite.measures})
  headlines = {spec.suite.headline for spec in specs}
  column = f"average/{headlines.pop() if len(headlines) == 1 else 'headline'}"
  for system, row in rows.items():
    row[column] = float(np.mean([results[spec.name][system].metrics[spec.suite.headline] for spec in specs]))
  return rows


def _per_query_lines(results: Results, specs: Sequence[dataset_spec.DatasetSpec]) -> list[str]:
  lines = []
  for spec in specs:
    if len(specs) > 1:
      lines.append(f"# {spec.name}")
    lines.append("system\tquery\t" + "\t".join(spec.suite.measures))
    for label, result in results[spec.name].items():
      for qid in result.per_query[spec.suite.headline]:
        values = "\t".join(f"{result.per_query[m][qid]:.4f}" for m in spec.suite.measures)
        lines.append(f"{label}\t{qid}\t{values}")
  return lines


def _summary(args: argparse.Namespace, results: Results, specs: Sequence[dataset_spec.DatasetSpec],
             rows: dict[str, dict[str, float]]) -> dict:
  """The settings, each dataset's suite, source and number of evaluated queries, and the table's numbers."""
  datasets = {}
  for spec in specs:
    evaluated = next(iter(results[spec.name].values())).per_query[spec.suite.headline]
    datasets[spec.name] = {"suite": spec.suite.name, "measures": list(spec.suite.measures),
                           "relevance_level": spec.suite.relevance_level, "source": spec.source,
                           "queries": len(evaluated)}
  return {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "datasets": datasets, "metrics": rows,
          "host_allocator": host_allocator.active()}


def write_results(out: str, results: Results, specs: Sequence[dataset_spec.DatasetSpec],
                  summary: dict) -> None:
  """Run files, metrics and thoughts of every (dataset, system) (in `out/NAME/` when there are several datasets),
  then `summary.json`, each file atomically."""
  for spec in specs:
    directory = storage.join(out, spec.name) if len(specs) > 1 else out
    for label, result in results[spec.name].items():
      evaluation.write_evaluation(directory, label, result)
  atomic_write_json(storage.join(out, "summary.json"), summary)


def main(argv: Sequence[str]) -> Results:
  args = parser().parse_args(argv)
  results, specs = evaluate_all(args)
  rows = table_rows(results, specs)
  # The table first: if writing fails, the hours behind these numbers are not lost with it.
  print(evaluation.format_table(rows))
  if args.per_query:
    print("\n".join(_per_query_lines(results, specs)))
  if args.out:
    try:
      write_results(args.out, results, specs, _summary(args, results, specs, rows))
    except OSError as e:
      raise OSError(f"--out={args.out}: writing the results failed ({e}); the table above is complete") from e
  return results


def cli() -> None:
  """`python -m o1jax.eval` and the `o1jax-eval` command: one line and exit 1 on bad input."""
  host_allocator.reexec_on_cpu()  # the o1jax-eval command (`python -m` re-executed at the top already)
  try:
    main(sys.argv[1:])
  except (ValueError, OSError, RequestError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli()
