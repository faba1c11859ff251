"""Training records -> fixed-shape host batches of the shared contract (this process's rows only).

A record is a mapping {query_id, query, thought, positives, negatives[, positive_scores, negative_scores]};
`records` is any sequence with `len()` and `records[i]`: a list, or `o1jax.data.pipeline.TFRecordSource`,
which reads each record from its shard on demand.
Batch `i` is a pure function of (records, spec, i): epoch e = i // steps_per_epoch takes a permutation seeded by
(seed, e), and each example draws its positive, its negatives and its thought drop from an RNG seeded by
(seed, e, record index). So the data position is one integer, resume continues at the exact same example, and
the global batch does not depend on how many processes share it.

Output: this process's rows (batch_queries / process_count queries) of the batch contract of
`o1jax.data.batch`, as numpy arrays built with the templates of `o1jax.templates`.

Bad records. A record that cannot be read (`TFRecordError`) or batched (`RecordError`) stops the batch with that
error, naming it. With `skip_bad` it is replaced, wherever it falls, by the next record index that can be used
(warned once per record): the permutation still covers every index, so batches without a bad record are the
ones of a run on intact data, and a run that stopped at a corrupt record resumes with `skip_bad` at the same
example.
"""
from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
import dataclasses
import logging
from typing import Any

import numpy as np

from o1jax import templates
from o1jax.data.batch import TEACHER_FIELD, BatchShape
from o1jax.data.tfrecord import TFRecordError
from o1jax.tokenizer import SpecialIds

Record = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  batch_queries: int  # global Q
  group_size: int  # G = 1 positive + G-1 negatives
  lengths: templates.Lengths
  thought_drop: float = 0.1
  seed: int = 0
  teacher_scores: bool = False
  skip_bad: bool = False  # replace records that cannot be read or batched (module docstring)

  def shape(self) -> BatchShape:
    """The global batch these settings make."""
    return BatchShape(self.batch_queries, self.group_size, self.lengths.query_thought, self.lengths.doc,
                      self.teacher_scores)


class RecordError(ValueError):
  """A training record that cannot be batched; names the record index, its query id and the field."""

  def __init__(self, index: int, record: Record, field: str, problem: str):
    qid = record.get("query_id", "?") if isinstance(record, Mapping) else "?"
    super().__init__(f"record {index} (query_id {qid!r}): field {field!r}: {problem}")


def _texts(index: int, record: Record, field: str, allow_empty: bool) -> list[str]:
  value = record.get(field)
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise RecordError(index, record, field, f"expected a list of strings, got {type(value).__name__}")
  if not value and not allow_empty:
    raise RecordError(index, record, field, "is empty")
  return list(value)


def _scores(index: int, record: Record, field: str, count: int) -> np.ndarray:
  value = np.asarray(record.get(field, ()), np.float32)
  if value.shape != (count,):
    raise RecordError(index, record, field, f"expected {count} teacher scores, got shape {value.shape}")
  return value


class Batcher:
  """Random access to the global batches of a record collection; `batch(i)` gives this process's rows."""

  def __init__(self, records: Sequence[Record], tokenizer: Any, special: SpecialIds, spec: BatchSpec,
               process_index: int = 0, process_count: int = 1):
    if spec.group_size < 2:
      raise ValueError(f"group_size={spec.group_size}: need a positive and at least one negative")
    self.local_shape = spec.shape().per_process(process_count)
    if len(records) < spec.batch_queries:
      raise ValueError(f"{len(records)} records cannot fill one batch of {spec.batch_queries} queries")
    self.records, self.tokenizer, self.special, self.spec = records, tokenizer, special, spec
    self.local_queries = self.local_shape.queries
    self.first_query = process_index * self.local_queries
    self.steps_per_epoch = len(records) // spec.batch_queries  # the remainder of each epoch is dropped
    self._reported: set[int] = set()
    if spec.teacher_scores:
      self._check_teacher_scores()

  def _check_teacher_scores(self) -> None:
    """Distilling from records that carry no teacher scores is named before anything compiles."""
    try:
      record = self.records[0]
    except TFRecordError:
      return  # a corrupt record is the batches' to report, or to skip
    if isinstance(record, Mapping) and "positive_scores" not in record:
      raise RecordError(0, record, "positive_scores",
                        "config.train.w_distill > 0 needs teacher scores and the records carry none: ingest a file "
                        "that has them (python -m data_tools.ingest) or add them (python -m data_tools.score)")

  def _tokenize(self, texts: list[str]) -> list[list[int]]:
    # BOS comes from the templates, never from the tokenizer.
    return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

  def _example(self, epoch: int, index: int) -> tuple[str, str, list[str], np.ndarray | None]:
    """(query, thought or '', G documents, teacher scores or None) of record `index` in `epoch`."""
    record = self.records[index]
    if not isinstance(record, Mapping):
      raise RecordError(index, {}, "record", f"expected a mapping, got {type(record).__name__}")
    query, thought = record.get("query"), record.get("thought", "")
    if not isinstance(query, str) or not query:
      raise RecordError(index, record, "query", "expected a non-empty string")
    if not isinstance(thought, str):
      raise RecordError(index, record, "thought", f"expected a string, got {type(thought).__name__}")
    positives = _texts(index, record, "positives", allow_empty=False)
    negatives = _texts(index, record, "negatives", allow_empty=False)
    rng = np.random.default_rng([self.spec.seed, epoch, index])
    if rng.random() < self.spec.thought_drop:
      thought = ""
    pos = int(rng.integers(len(positives)))
    need = self.spec.group_size - 1
    if len(negatives) >= need:
      neg = rng.choice(len(negatives), need, replace=False)
    else:  # too few: cycle through a shuffled order
      neg = np.resize(rng.permutation(len(negatives)), need)
    docs = [positives[pos]] + [negatives[n] for n in neg]
    scores = None
    if self.spec.teacher_scores:
      pos_scores = _scores(index, record, "positive_scores", len(positives))
      neg_scores = _scores(index, record, "negative_scores", len(negatives))
      scores = np.concatenate([pos_scores[[pos]], neg_scores[neg]])
    return query, thought, docs, scores

  def _usable_example(self, epoch: int, index: int) -> tuple[str, str, list[str], np.ndarray | None]:
    """`_example` of record `index`, or under skip_bad of the first usable record from `index` on."""
    if not self.spec.skip_bad:
      return self._example(epoch, index)
    for candidate in (*range(index, len(self.records)), *range(index)):
      try:
        return self._example(epoch, candidate)
      except (RecordError, TFRecordError) as e:
        if candidate not in self._reported:
          self._reported.add(candidate)
          logging.warning("skip_bad: record %d replaced by the next usable record: %s", candidate, e)
    raise RecordError(index, {}, "record", f"skip_bad: none of the {len(self.records)} records can be used")

  def batch(self, i: int) -> dict[str, np.ndarray]:
    spec, special = self.spec, self.special
    epoch, within = divmod(i, self.steps_per_epoch)
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(self.records))
    start = within * spec.batch_queries + self.first_query
    examples = [self._usable_example(epoch, int(r)) for r in order[start:start + self.local_queries]]
    # One tokenizer call per batch: its per-call overhead is a large part of a small batch's cost.
    n = len(examples)
    ids = self._tokenize([e[0] for e in examples] + [e[1] for e in examples] + [d for e in examples for d in e[2]])
    queries, thoughts, docs = ids[:n], ids[n:2 * n], ids[2 * n:]
    seqs, loss_masks = zip(*(templates.query_sequence(q, t, special, spec.lengths) for q, t in zip(queries, thoughts)))
    query_ids, query_mask = templates.pad_right(seqs, spec.lengths.query_thought, special.pad)
    loss_mask, _ = templates.pad_right(loss_masks, spec.lengths.query_thought, 0)
    doc_seqs = [templates.document_sequence(d, special, spec.lengths.doc) for d in docs]
    doc_ids, doc_mask = templates.pad_right(doc_seqs, spec.lengths.doc, special.pad)
    out = {"query_ids": query_ids, "query_mask": query_mask, "query_loss_mask": loss_mask,
           "doc_ids": doc_ids, "doc_mask": doc_mask}
    if spec.teacher_scores:
      out[TEACHER_FIELD] = np.stack([e[3] for e in examples])
    return out


class Prefetcher:
  """Iterates `batcher.batch(start), batch(start+1), ...`, built `depth` ahead by `workers` background threads.

  A batch is a pure function of its index, so threads may build them in any order; they are yielded in order.
  The tokenizer (Rust) and file reads release the GIL, so a second thread pays off even in CPython. An error in
  a batch is re-raised (with its traceback) by the `next()` that reaches it.
  """

  def __init__(self, batcher: Batcher, start: int, depth: int = 4, workers: int = 2):
    self._batcher, self._next = batcher, start
    self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="batch-prefetch")
    self._pending = collections.deque(self._submit() for _ in range(depth))

  def _submit(self) -> futures.Future:
    future = self._pool.submit(self._batcher.batch, self._next)
    self._next += 1
    return future

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    future = self._pending.popleft()
    self._pending.append(self._submit())
    return future.result()

  def close(self) -> None:
    for future in self._pending:
      future.cancel()
    self._pool.shutdown(wait=True)
