"""Maximum inner product search: exact (blocked matmul + top-k in JAX, corpus sharded over devices) and ScaNN.

Both take float32 vectors and return `(indices int32 [Q, k], scores float32 [Q, k])`, best first. Exact search is
the reference and the fallback where ScaNN has no wheel (it ships Linux x86-64 only).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

_AXIS = "corpus"


class Searcher(Protocol):
  num_docs: int

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ...


def _check_inputs(db: np.ndarray) -> np.ndarray:
  db = np.ascontiguousarray(db, dtype=np.float32)
  if db.ndim != 2 or db.shape[0] == 0:
    raise ValueError(f"corpus embeddings must be a non-empty [N, D] array, got shape {db.shape}")
  if not np.isfinite(db).all():
    raise ValueError("corpus embeddings contain NaN or inf")
  return db


def _check_queries(queries: np.ndarray, dim: int, k: int, num_docs: int) -> tuple[np.ndarray, int]:
  queries = np.ascontiguousarray(queries, dtype=np.float32)
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries must be [Q, {dim}], got shape {queries.shape}")
  if not np.isfinite(queries).all():
    raise ValueError("query embeddings contain NaN or inf")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  return queries, min(k, num_docs)


def _merge_top_k(scores: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  top_scores, positions = jax.lax.top_k(scores, k)
  return top_scores, jnp.take_along_axis(ids, positions, axis=1)


def _shard_top_k(db_shard: jax.Array, queries: jax.Array, *, k: int, block: int, num_docs: int):
  """Running top-k over this shard's corpus rows, one [Q, block] score block at a time (bounded memory)."""
  rows, dim = db_shard.shape
  first_row = jax.lax.axis_index(_AXIS) * rows
  num_queries = queries.shape[0]

  def step(carry, inputs):
    best_scores, best_ids = carry
    block_index, block_rows = inputs
    scores = jnp.dot(queries, block_rows.T, precision=jax.lax.Precision.HIGHEST)
    ids = first_row + block_index * block + jnp.arange(block, dtype=jnp.int32)
    scores = jnp.where(ids[None, :] < num_docs, scores, -jnp.inf)  # padding rows never win
    ids = jnp.broadcast_to(ids, scores.shape)
    return _merge_top_k(jnp.concatenate([best_scores, scores], 1), jnp.concatenate([best_ids, ids], 1), k), None

  init = (jnp.full((num_queries, k), -jnp.inf, jnp.float32), jnp.full((num_queries, k), -1, jnp.int32))
  init = jax.lax.pcast(init, (_AXIS,), to="varying")  # the carry differs per shard
  blocks = db_shard.reshape(rows // block, block, dim)
  (scores, ids), _ = jax.lax.scan(step, init, (jnp.arange(rows // block, dtype=jnp.int32), blocks))
  return scores, ids


class ExactSearch:
  """Exact inner-product search; the corpus rows are split over a 1-D device mesh, top-k per shard then merged."""

  def __init__(self, db: np.ndarray, block_rows: int = 8192, query_batch: int = 256,
               devices: Sequence[jax.Device] | None = None):
    db = _check_inputs(db)
    devices = list(devices or jax.devices())
    self.num_docs, self.dim = db.shape
    self._query_batch = query_batch
    shards = len(devices)
    self._block = min(block_rows, -(-self.num_docs // shards))
    rows_per_shard = -(-self.num_docs // (shards * self._block)) * self._block
    padded = np.zeros((rows_per_shard * shards, self.dim), np.float32)
    padded[:self.num_docs] = db
    self._mesh = jax.make_mesh((shards,), (_AXIS,), axis_types=(AxisType.Auto,), devices=devices)
    self._db = jax.device_put(padded, NamedSharding(self._mesh, P(_AXIS)))
    self._rows_per_shard = rows_per_shard

  @functools.lru_cache(maxsize=8)
  def _search_fn(self, k: int):
    shard_k = min(k, self._rows_per_shard)
    per_shard = jax.shard_map(
        functools.partial(_shard_top_k, k=shard_k, block=self._block, num_docs=self.num_docs),
        mesh=self._mesh, in_specs=(P(_AXIS), P()), out_specs=(P(None, _AXIS), P(None, _AXIS)))

    @jax.jit
    def search(db, queries):
      scores, ids = per_shard(db, queries)
      return _merge_top_k(scores, ids, k)

    return search

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries, k = _check_queries(queries, self.dim, k, self.num_docs)
    search = self._search_fn(k)
    indices = np.empty((len(queries), k), np.int32)
    scores = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), self._query_batch):
      batch = queries[start:start + self._query_batch]
      padded = np.zeros((self._query_batch, self.dim), np.float32)  # one shape: one compile
      padded[:len(batch)] = batch
      top_scores, top_ids = search(self._db, padded)
      scores[start:start + len(batch)] = np.asarray(top_scores)[:len(batch)]
      indices[start:start + len(batch)] = np.asarray(top_ids)[:len(batch)]
    return indices, scores


def _import_scann():
  """`scann_ops_pybind`, or None where ScaNN is not installed.

  `import scann` also loads ScaNN's TensorFlow ops whenever TensorFlow is importable, and those ops only link
  against the TensorFlow version ScaNN was built with; hiding TensorFlow for the import keeps the pybind path,
  which is all we use, working next to any TensorFlow.
  """
  previous = sys.modules.get("tensorflow")
  sys.modules["tensorflow"] = None  # makes `import tensorflow` raise ModuleNotFoundError, which scann catches
  try:
    from scann import scann_ops_pybind
  except ImportError:
    return None
  finally:
    if previous is None:
      del sys.modules["tensorflow"]
    else:
      sys.modules["tensorflow"] = previous
  return scann_ops_pybind


@dataclasses.dataclass(frozen=True)
class ScannConfig:
  brute_force: bool
  num_leaves: int = 0
  leaves_to_search: int = 0
  training_sample_size: int = 0
  anisotropic_threshold: float = 0.2
  reorder: int = 0  # candidates rescored exactly after the asymmetric-hashing pass


# ScaNN's algorithm guide: brute force below ~20k points, where partitioning and quantization do not pay off.
BRUTE_FORCE_MAX_DOCS = 20_000


def scann_config(num_docs: int, k: int) -> ScannConfig:
  """Parameters from the corpus size: brute force when small, else a tree of ~sqrt(N) leaves + AH + reorder."""
  if num_docs <= BRUTE_FORCE_MAX_DOCS:
    return ScannConfig(brute_force=True)
  num_leaves = max(16, int(round(2 * math.sqrt(num_docs))))
  return ScannConfig(brute_force=False, num_leaves=num_leaves, leaves_to_search=max(8, num_leaves // 10),
                     training_sample_size=min(num_docs, 250_000), reorder=max(4 * k, 400))


class ScannSearch:
  """ScaNN inner-product search (`scann_ops_pybind`), configured by `scann_config` unless given a config.

  ScaNN 1.4.2 takes no seed for its tree training, so two tree builds can differ slightly (brute force is exact);
  exact search is the deterministic reference.
  """

  def __init__(self, db: np.ndarray, k: int = 1000, config: ScannConfig | None = None):
    scann_ops_pybind = _import_scann()
    if scann_ops_pybind is None:
      raise ImportError("ScaNN is not installed (pip install scann; Linux x86-64 only): use ExactSearch")
    db = _check_inputs(db)
    self.num_docs, self.dim = db.shape
    self.config = config or scann_config(self.num_docs, k)
    builder = scann_ops_pybind.builder(db, min(k, self.num_docs), "dot_product")
    if self.config.brute_force:
      builder = builder.score_brute_force()
    else:
      c = self.config
      builder = builder.tree(num_leaves=c.num_leaves, num_leaves_to_search=c.leaves_to_search,
                             training_sample_size=c.training_sample_size)
      builder = builder.score_ah(2, anisotropic_quantization_threshold=c.anisotropic_threshold)
      builder = builder.reorder(c.reorder)
    self._searcher = builder.build()

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries, k = _check_queries(queries, self.dim, k, self.num_docs)
    pre_reorder = None if self.config.brute_force else max(self.config.reorder, k)
    neighbors, distances = self._searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre_reorder)
    # A tree search can find fewer than k candidates; ScaNN pads those slots with NaN scores (and index 0).
    scores = np.asarray(distances, np.float32)
    missing = np.isnan(scores)
    indices = np.where(missing, -1, np.asarray(neighbors, np.int64)).astype(np.int32)
    return indices, np.where(missing, -np.inf, scores).astype(np.float32)


def build_searcher(db: np.ndarray, backend: str = "auto", k: int = 1000) -> Searcher:
  """`backend`: "exact", "scann", or "auto" (ScaNN when installed, else exact)."""
  if backend == "exact" or (backend == "auto" and _import_scann() is None):
    return ExactSearch(db)
  if backend in ("scann", "auto"):
    return ScannSearch(db, k=k)
  raise ValueError(f"unknown search backend {backend!r}; use auto, exact or scann")


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
  """Mean fraction of each query's exact top-k that the approximate top-k found (ANN recall@k)."""
  return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact)]))


def search_without_self_hits(searcher: Searcher, queries: np.ndarray, k: int, query_ids: Sequence[str],
                             doc_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Top-k excluding the doc whose id equals the query id (ArguAna, Quora: a query is also in the corpus)."""
  if len(query_ids) != len(queries):
    raise ValueError(f"{len(query_ids)} query ids for {len(queries)} queries")
  k = min(k, searcher.num_docs)
  indices, scores = searcher.search(queries, k + 1)
  out_indices = np.full((len(queries), k), -1, np.int32)
  out_scores = np.full((len(queries), k), -np.inf, np.float32)
  for row, qid in enumerate(query_ids):
    keep = [i for i, index in enumerate(indices[row]) if index >= 0 and doc_ids[index] != qid][:k]
    out_indices[row, :len(keep)] = indices[row, keep]
    out_scores[row, :len(keep)] = scores[row, keep]
  return out_indices, out_scores
