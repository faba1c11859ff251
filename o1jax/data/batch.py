"""The batch contract between the input pipeline and the training step, defined once.

A global training batch of Q queries in groups of G passages:

  query_ids, query_mask, query_loss_mask  int32   [Q, Lq]    right-padded `[BOS] <query> q </query> <thought> t EOS
                                                             <emb>`; loss mask 1 on the thought tokens and EOS
  doc_ids, doc_mask                       int32   [Q*G, Ld]  row i*G is query i's positive, then its negatives
  teacher_scores                          float32 [Q, G]     only when distilling (w_distill > 0)

The batcher builds each process's rows of it, the step checks it, and AOT compilation, benchmarks and tests
make it from shapes alone (`abstract`, `zeros`).
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax
import numpy as np

from o1jax import sharding

QUERY_FIELDS = ("query_ids", "query_mask", "query_loss_mask")
DOC_FIELDS = ("doc_ids", "doc_mask")
TEACHER_FIELD = "teacher_scores"


@dataclasses.dataclass(frozen=True)
class BatchShape:
  queries: int  # Q: global, or one process's rows (`per_process`)
  group_size: int  # G = 1 positive + G-1 negatives
  query_length: int  # Lq: the whole query + thought sequence, `<emb>` included
  doc_length: int  # Ld
  teacher_scores: bool = False

  def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array of the batch."""
    out = {name: ((self.queries, self.query_length), np.dtype(np.int32)) for name in QUERY_FIELDS}
    out.update({name: ((self.queries * self.group_size, self.doc_length), np.dtype(np.int32)) for name in DOC_FIELDS})
    if self.teacher_scores:
      out[TEACHER_FIELD] = ((self.queries, self.group_size), np.dtype(np.float32))
    return out

  def per_process(self, process_count: int) -> BatchShape:
    """The rows one of `process_count` processes feeds (the global batch is their concatenation)."""
    if self.queries % process_count:
      raise ValueError(f"batch_queries={self.queries} is not divisible by {process_count} processes")
    return dataclasses.replace(self, queries=self.queries // process_count)

  def abstract(self, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs sharded over the batch axes: what AOT compilation lowers with."""
    rows = sharding.batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for name, (shape, dtype) in self.fields().items()}

  def zeros(self) -> dict[str, np.ndarray]:
    """A batch of this shape whose every row holds one real token (masks 1 at position 0)."""
    out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.fields().items()}
    for name in ("query_mask", "doc_mask"):
      out[name][:, 0] = 1
    return out

  def tokens(self) -> int:
    """Token positions computed per batch (padding included)."""
    return self.queries * self.query_length + self.queries * self.group_size * self.doc_length

  @classmethod
  def of(cls, batch: Mapping[str, Any], group_size: int) -> BatchShape:
    """The shape of an actual (host or device, global or abstract) batch; a ValueError names the field that
    breaks the contract."""
    missing = [name for name in QUERY_FIELDS + DOC_FIELDS if name not in batch]
    if missing:
      raise ValueError(f"batch lacks fields {missing}")
    queries, query_length = batch["query_ids"].shape
    docs, doc_length = batch["doc_ids"].shape
    if docs != queries * group_size:
      raise ValueError(f"batch: doc_ids has {docs} rows; expected queries ({queries}) x group_size ({group_size})")
    shape = cls(queries, group_size, query_length, doc_length, TEACHER_FIELD in batch)
    for name, (expected, _) in shape.fields().items():
      if tuple(batch[name].shape) != expected:
        raise ValueError(f"batch: {name} has shape {tuple(batch[name].shape)}; expected {expected}")
    return shape
