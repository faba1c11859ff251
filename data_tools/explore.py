"""Exploration prompts (METHOD §5): one prompt per candidate thought, keyed by query id.

Each prompt is the task line, `num_examples` (query, positive passage) pairs drawn from OTHER training
queries, re-drawn for every candidate, then the query. Draws and sampling seeds are functions of
(seed, query id, candidate index) only, so a query gets the same prompts whatever shard, worker or batch
it lands in, and a resumed run regenerates exactly what a killed one would have.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Protocol

import numpy as np

from data_tools.inputs import TrainQuery, stable_hash

TASK_LINE = "Think about a plausible response to address the query."

RequestKey = tuple[str, int]  # (query id, candidate index)


@dataclasses.dataclass(frozen=True)
class ThoughtRequest:
  query_id: str
  candidate: int
  messages: tuple[Mapping[str, str], ...]  # OpenAI-style chat messages
  seed: int  # sampling seed of this request, < 2**31

  @property
  def key(self) -> RequestKey:
    return (self.query_id, self.candidate)


class ExpertError(RuntimeError):
  """An expert failed for one request; the message names the query id (and the endpoint for HTTP)."""


class ExpertUnavailable(ExpertError):
  """The expert kept failing for reasons of its own (HTTP 429 / 5xx, timeouts, refused connections) after every
  retry. Unlike other ExpertErrors this says nothing about the query, so a query is never skipped for it."""


class Expert(Protocol):
  """Writes one thought per request. Results are keyed by (query id, candidate), never by position."""

  def generate(self, requests: Sequence[ThoughtRequest]) -> dict[RequestKey, str]:
    ...


def _clip_words(text: str, max_words: int) -> str:
  words = text.split()
  return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


class PromptBuilder:
  """Builds the k exploration requests of a query from a pool of (query, positive) pairs."""

  def __init__(self, pool: Sequence[TrainQuery], seed: int, num_examples: int = 3, example_max_words: int = 64):
    self.pool = [(q.query_id, q.query, q.positives[0]) for q in pool if q.positives]
    if num_examples and len(self.pool) <= num_examples:
      raise ValueError(f"need more than {num_examples} training pairs to draw in-context examples from, "
                       f"got {len(self.pool)}")
    self.seed, self.num_examples, self.example_max_words = seed, num_examples, example_max_words

  def _examples(self, query_id: str, candidate: int) -> list[tuple[str, str]]:
    if not self.num_examples:
      return []
    rng = np.random.default_rng(stable_hash(self.seed, "examples", query_id, candidate))
    drawn = rng.choice(len(self.pool), size=self.num_examples + 1, replace=False)
    others = [self.pool[i] for i in drawn if self.pool[i][0] != query_id][:self.num_examples]
    return [(query, _clip_words(positive, self.example_max_words)) for _, query, positive in others]

  def messages(self, query: str, examples: Sequence[tuple[str, str]]) -> tuple[Mapping[str, str], ...]:
    parts = [TASK_LINE, *(f"Query: {q}\nResponse: {p}" for q, p in examples), f"Query: {query}\nResponse:"]
    return ({"role": "user", "content": "\n\n".join(parts)},)

  def requests(self, query: TrainQuery, k: int) -> list[ThoughtRequest]:
    return [ThoughtRequest(query.query_id, c, self.messages(query.query, self._examples(query.query_id, c)),
                           stable_hash(self.seed, "sample", query.query_id, c) % 2**31) for c in range(k)]


def explore(expert: Expert, builder: PromptBuilder, queries: Sequence[TrainQuery], k: int) -> dict[str, list[str]]:
  """The non-empty candidate thoughts of each query id (at most k, stripped, in candidate order).

  An empty answer is no thought: kept, it could win the vote and teach the model to think nothing. Checks the
  expert answered every request and nothing else.
  """
  requests = [r for q in queries for r in builder.requests(q, k)]
  answers = expert.generate(requests)
  missing = [r.key for r in requests if r.key not in answers]
  extra = set(answers) - {r.key for r in requests}
  if missing or extra:
    raise ExpertError(f"expert answers do not match requests: missing {missing[:5]}, unexpected {sorted(extra)[:5]}")
  return {q.query_id: [t for c in range(k) if (t := answers[(q.query_id, c)].strip())] for q in queries}


class Exploration:
  """Candidate thoughts for batches of queries; with `skip_bad`, the queries the expert fails on are set aside.

  An unavailable expert is never the query's fault: skipping the query would drop it, for good, from a shard
  marked complete, so `ExpertUnavailable` always propagates and leaves the shard to the next run.
  """

  def __init__(self, expert: Expert, builder: PromptBuilder, k: int, skip_bad: bool):
    self.expert, self.builder, self.k, self.skip_bad = expert, builder, k, skip_bad

  def skippable(self, error: Exception) -> bool:
    return self.skip_bad and not isinstance(error, ExpertUnavailable)

  def set_aside(self, query_id: str, error: Exception, bad: dict[str, str]) -> None:
    """Records `error` as the reason `query_id` is left out, or raises it when it may not be skipped."""
    if not self.skippable(error):
      raise error
    bad[query_id] = str(error)

  def _explore(self, queries: Sequence[TrainQuery], bad: dict[str, str]) -> dict[str, list[str]]:
    try:
      return explore(self.expert, self.builder, queries, self.k)
    except ExpertError as e:
      if not self.skippable(e):
        raise
      if len(queries) == 1:
        bad[queries[0].query_id] = str(e)
        return {}
    thoughts = {}  # find the failing queries one by one
    for q in queries:
      try:
        thoughts.update(explore(self.expert, self.builder, [q], self.k))
      except ExpertError as e:
        self.set_aside(q.query_id, e, bad)
    return thoughts

  def candidates(self, queries: Sequence[TrainQuery], bad: dict[str, str]) -> dict[str, list[str]]:
    """The non-empty candidates of every query that has one; the others are set aside in `bad` (or raise)."""
    thoughts = self._explore(queries, bad)
    for q in queries:
      if q.query_id in thoughts and not thoughts[q.query_id]:
        self.set_aside(q.query_id, ExpertError(
            f"query {q.query_id!r}: the expert answered all {self.k} candidates with empty text"), bad)
    return {query_id: found for query_id, found in thoughts.items() if found}
