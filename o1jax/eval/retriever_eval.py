"""An o1jax `Retriever` evaluated on a BEIR split: index the corpus, search every query, score with trec_eval, and
keep the thoughts each query was embedded with.

Shared by `python -m o1jax.eval`, evaluation during training and API users, so all three give the same numbers.
"""
from __future__ import annotations

import argparse

from collections.abc import Sequence
import dataclasses
import os

import jax

from o1jax.data.readers import BeirDataset
from o1jax.eval import evaluation, metrics, thoughts_file
from o1jax.eval.thoughts_file import QueryThoughts
from o1jax.retrieval.retriever import Retriever, Sampling
from o1jax.templates import document_text


def first_queries(dataset: BeirDataset, max_queries: int) -> BeirDataset:
  """The first `max_queries` judged queries (file order) with their qrels; the corpus is unchanged. 0 = all."""
  if max_queries < 0:
    raise ValueError(f"max_queries must be >= 0 (0 = all), got {max_queries}")
  if not max_queries or max_queries >= len(dataset.queries):
    return dataset
  kept = list(dataset.queries)[:max_queries]
  return dataclasses.replace(dataset, queries={q: dataset.queries[q] for q in kept},
                             qrels={q: dataset.qrels[q] for q in kept})


def index_corpus(retriever: Retriever, dataset: BeirDataset, backend: str = "auto", k: int = 1000,
                 cache_dir: str | os.PathLike | None = None) -> None:
  """Indexes the split's corpus, each document as METHOD §2's `title text`."""
  doc_ids = list(dataset.corpus)
  retriever.index(doc_ids, [document_text(dataset.corpus[d].title, dataset.corpus[d].text) for d in doc_ids],
                  backend, k, cache_dir)


def _search_and_score(retriever: Retriever, dataset: BeirDataset, query_ids: list[str], vectors, k: int,
                      drop_self_hits: bool, measures: Sequence[str], relevance_level: int) -> evaluation.Evaluation:
  hits = retriever.search_vectors(vectors, k, self_hit_ids=query_ids if drop_self_hits else None)
  return evaluation.evaluate_run(dataset, {q: dict(h) for q, h in zip(query_ids, hits)}, measures, relevance_level)


def _embedded_thoughts(retriever: Retriever, query_ids: Sequence[str], queries: Sequence[str],
                       thought_ids: Sequence[Sequence[Sequence[int]]]) -> dict[str, QueryThoughts]:
  """{query id: the thoughts it was embedded with}, as text and as the embedded ids."""
  return {q: QueryThoughts(text, texts, ids) for q, text, texts, ids
          in zip(query_ids, queries, retriever.decode_thoughts(thought_ids), thought_ids)}


def evaluate(retriever: Retriever, dataset: BeirDataset, think: int, k: int = 1000, sampling: Sampling = Sampling(),
             rng: jax.Array | int = 0, drop_self_hits: bool = False,
             measures: Sequence[str] = metrics.DEFAULT_MEASURES, relevance_level: int = 1) -> evaluation.Evaluation:
  """Top-`k` run of every query (with `think` thoughts each, 0 = none) against the indexed corpus, and its metrics;
  with thinking, the thoughts each query was embedded with (`Evaluation.thoughts`)."""
  query_ids = list(dataset.queries)
  queries = [dataset.queries[q] for q in query_ids]
  thoughts = None
  if think:
    thought_ids = retriever.think_with(queries, think, sampling, rng)
    vectors = retriever.encode_with_thoughts(queries, thought_ids)
    thoughts = _embedded_thoughts(retriever, query_ids, queries, thought_ids)
  else:
    vectors = retriever.encode_queries(queries)
  result = _search_and_score(retriever, dataset, query_ids, vectors, k, drop_self_hits, measures, relevance_level)
  return dataclasses.replace(result, thoughts=thoughts)


def evaluate_given_thoughts(retriever: Retriever, dataset: BeirDataset, given: dict[str, QueryThoughts],
                            max_thought_tokens: int, k: int = 1000, drop_self_hits: bool = False,
                            measures: Sequence[str] = metrics.DEFAULT_MEASURES,
                            relevance_level: int = 1) -> evaluation.Evaluation:
  """`evaluate` with thoughts written elsewhere (`given[query id]`, e.g. read by `thoughts_file.read_thoughts`):
  each query embedded with each of its thoughts, cut to `max_thought_tokens` tokens (the budget the model's own
  thoughts get), vectors averaged as for `think`. Thoughts with token ids are embedded as they are; text-only ones
  are tokenized. `Evaluation.thoughts` holds what was embedded."""
  query_ids = list(dataset.queries)
  thoughts_file.check_covers("given thoughts", query_ids, given)
  queries = [dataset.queries[q] for q in query_ids]
  thought_ids = []
  for q in query_ids:
    ids = given[q].token_ids
    if ids is None:  # an empty text is the thought-dropped form
      ids = [retriever.tokenize([text], f"query {q!r}: thought")[0] if text.strip() else [] for text in given[q].texts]
    thought_ids.append([list(t[:max_thought_tokens]) for t in ids])
  vectors = retriever.encode_with_thoughts(queries, thought_ids)
  result = _search_and_score(retriever, dataset, query_ids, vectors, k, drop_self_hits, measures, relevance_level)
  return dataclasses.replace(result, thoughts=_embedded_thoughts(retriever, query_ids, queries, thought_ids))


def add_sampling_options(p: argparse.ArgumentParser) -> None:
  """The thought-sampling options of the evaluation commands, named after `Sampling`'s fields."""
  p.add_argument("--temperature", type=float, default=Sampling.temperature)
  p.add_argument("--top_p", type=float, default=Sampling.top_p)
  p.add_argument("--max_new_tokens", type=int, default=Sampling.max_new_tokens)
  p.add_argument("--repetition_penalty", type=float, default=Sampling.repetition_penalty,
                 help="transformers' repetition penalty on tokens of the query and the thought so far (1 = off)")


def sampling_from(args: argparse.Namespace) -> Sampling:
  """`add_sampling_options`' values as a `Sampling`; a ValueError that names the option."""
  try:
    return Sampling(args.temperature, args.top_p, args.max_new_tokens, args.repetition_penalty)
  except ValueError as e:
    raise ValueError(f"--{e}") from None  # Sampling's messages start with the field name, the option's name


def think_option(value: str) -> int:
  """`--think` of the evaluation commands: a number of thoughts per query, or 'off' (0)."""
  if value == "off":
    return 0
  try:
    k = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number of thoughts or 'off', got {value!r}") from None
  if k < 0:
    raise argparse.ArgumentTypeError(f"expected >= 0 thoughts, got {k}")
  return k
