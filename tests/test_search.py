"""Exact search against numpy; ScaNN recall against exact search on real MiniLM embeddings of SciFact."""
import jax
import numpy as np
import pytest

from o1jax.retrieval import search


def _numpy_top_k(queries, db, k):
  scores = queries @ db.T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("num_docs,k,block_rows,num_devices", [
    (1001, 10, 64, 8),  # rows not a multiple of the shards: padding must never win
    (37, 20, 8192, 8),  # k larger than a shard's rows
    (500, 100, 128, 1),
])
def test_exact_matches_numpy(num_docs, k, block_rows, num_devices):
  assert len(jax.devices()) == 8  # tests/conftest.py simulates 8 devices
  # Small integers: every dot product is exact in float32, so the order (ties included: lower index first, as
  # lax.top_k and a stable argsort both break them) must match exactly.
  rng = np.random.default_rng(num_docs)
  db = rng.integers(-3, 4, (num_docs, 24)).astype(np.float32)
  queries = rng.integers(-3, 4, (300, 24)).astype(np.float32)  # more than one query batch
  searcher = search.ExactSearch(db, block_rows=block_rows, query_batch=128, devices=jax.devices()[:num_devices])
  indices, scores = searcher.search(queries, k)
  expected_indices, expected_scores = _numpy_top_k(queries, db, k)
  assert indices.dtype == np.int32 and scores.dtype == np.float32 and indices.shape == (300, k)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


def test_k_capped_and_bad_input():
  db = np.eye(4, dtype=np.float32)
  searcher = search.ExactSearch(db)
  indices, _ = searcher.search(db, 10)
  assert indices.shape == (4, 4) and (indices[:, 0] == np.arange(4)).all()
  with pytest.raises(ValueError, match=r"queries must be \[Q, 4\]"):
    searcher.search(np.ones((2, 3), np.float32), 1)
  with pytest.raises(ValueError, match="NaN"):
    searcher.search(np.full((1, 4), np.nan, np.float32), 1)
  with pytest.raises(ValueError, match="non-empty"):
    search.ExactSearch(np.zeros((0, 4), np.float32))
  with pytest.raises(ValueError, match="unknown search backend"):
    search.build_searcher(db, "faiss")


def test_self_hits_removed():
  rng = np.random.default_rng(1)
  db = rng.standard_normal((50, 8)).astype(np.float32)
  doc_ids = [f"d{i}" for i in range(50)]
  searcher = search.ExactSearch(db)
  indices, scores = search.search_without_self_hits(searcher, db[:5], 3, doc_ids[:5], doc_ids)
  expected, _ = _numpy_top_k(db[:5], db, 4)
  for row in range(5):
    assert row not in indices[row]  # each query's own doc is its best hit, and is gone
    np.testing.assert_array_equal(indices[row], [i for i in expected[row] if i != row][:3])
  indices, _ = search.search_without_self_hits(searcher, db[:2], 3, ["x", "y"], doc_ids)
  np.testing.assert_array_equal(indices, _numpy_top_k(db[:2], db, 3)[0])


def test_scann_config_from_corpus_size():
  assert search.scann_config(5183, 1000).brute_force
  config = search.scann_config(1_000_000, 100)
  assert not config.brute_force and config.num_leaves == 2000 and config.reorder >= 400


@pytest.fixture(scope="module")
def scifact_embeddings(shared_dir):
  """MiniLM embeddings of the SciFact corpus (cached on disk outside the repo) and its 300 test queries."""
  from o1jax.data.readers import load_beir
  from o1jax.eval.baselines import cached_doc_encoder
  from o1jax.retrieval.sentence_encoder import SentenceEncoder
  from o1jax.templates import document_text
  dataset = load_beir(shared_dir / "data/beir-scifact", "test")
  encoder = SentenceEncoder()
  docs = cached_doc_encoder(encoder)([document_text(d.title, d.text) for d in dataset.corpus.values()])
  queries = encoder.encode(list(dataset.queries.values()))
  return docs, queries


def test_scann_recall_on_scifact(scifact_embeddings):
  docs, queries = scifact_embeddings
  assert docs.shape == (5183, 384)
  exact, _ = search.ExactSearch(docs).search(queries, 100)
  auto = search.ScannSearch(docs, k=100)
  assert auto.config.brute_force
  assert search.recall_at_k(auto.search(queries, 100)[0], exact, 100) >= 0.99
  # The approximate path (tree + asymmetric hashing + exact reorder) on the same real embeddings. A query's top 100
  # is 2% of this corpus and spreads over many leaves (25 of 100 leaves: recall 0.87), hence brute force by default.
  config = search.ScannConfig(brute_force=False, num_leaves=50, leaves_to_search=40, training_sample_size=5183,
                              reorder=1000)
  tree = search.ScannSearch(docs, k=100, config=config)
  indices, scores = tree.search(queries, 100)
  assert search.recall_at_k(indices, exact, 100) >= 0.99
  reordered = np.take_along_axis(queries @ docs.T, np.maximum(indices, 0), 1)
  np.testing.assert_allclose(scores[indices >= 0], reordered[indices >= 0], rtol=1e-4, atol=1e-4)
