"""Retriever: vectors equal transformers' (LlamaModel's final hidden state at `<emb>`) for documents, no-thought
queries and every query+thought sequence; thoughts are generated ids appended without re-tokenizing; K-thought
query vectors are the re-normalised mean of the separately embedded sequences; search equals brute force.

A tiny random Llama with the real SmolLM2 tokenizer (from the shared GGUF), exported as a Hugging Face directory.
"""
import numpy as np
import pytest
import jax
import torch
import transformers

from o1jax.convert import save_hf
from o1jax.model import ModelConfig, init_params
from o1jax.retrieval.retriever import Retriever, Sampling
from o1jax.tokenizer import add_special_tokens, load_tokenizer

QUERIES = ["what causes scurvy?", "Does vitamin C shorten colds?", "0-dimensional biomaterials lack inductive "
           "properties."]
DOCS = ["Scurvy is caused by a lack of vitamin C.", "Colds", "A randomized trial of zinc lozenges " * 80,
        "Biomaterials: nanoparticles and their osteoinductive properties in bone repair."] * 3
SAMPLING = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6)


def tiny_model_dir(tokenizer, out, seed=0):
  """A random 2-layer Llama over the tokenizer's vocabulary (+ the special tokens), exported like o1jax does."""
  cfg = ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  cfg, params, _ = add_special_tokens(tokenizer, cfg, init_params(cfg, jax.random.key(seed)))
  return save_hf(cfg, params, out, tokenizer)


@pytest.fixture(scope="module")
def model_dir(smollm2_gguf, tmp_path_factory):
  return tiny_model_dir(load_tokenizer(smollm2_gguf), tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def retriever(model_dir):
  return Retriever.from_pretrained(model_dir, tokens_per_batch=512)


@pytest.fixture(scope="module")
def hf_embed(model_dir):
  """Unit vector of one id sequence from transformers' reload of the export: final-norm hidden state, last token."""
  model = transformers.AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

  def embed(sequences):
    out = []
    with torch.no_grad():
      for seq in sequences:
        hidden = model(torch.tensor([seq])).last_hidden_state[0, -1].numpy()
        out.append(hidden / np.linalg.norm(hidden))
    return np.stack(out)
  return embed


def test_sequences_are_the_templates(retriever):
  s, tok = retriever.special, retriever.tokenizer
  assert s.bos is None  # SmolLM2 adds no BOS
  q = tok(QUERIES[0], add_special_tokens=False)["input_ids"]
  assert retriever.query_sequences(QUERIES[:1]) == [[[s.query, *q, s.query_end, s.thought, s.emb]]]
  docs = retriever.doc_sequences(DOCS[:3])
  assert docs[0] == tok(DOCS[0], add_special_tokens=False)["input_ids"] + [s.emb]
  assert len(docs[2]) == 512 and docs[2][-1] == s.emb  # truncated to the evaluation length, `<emb>` kept


def test_docs_and_no_thought_queries_match_transformers(retriever, hf_embed):
  docs = retriever.encode_docs(DOCS)
  assert docs.shape == (len(DOCS), 64) and docs.dtype == np.float32
  # Mixed lengths land in several width buckets and batches (tokens_per_batch=512): order must be restored.
  assert len(retriever.embedder.batches([len(d) for d in retriever.doc_sequences(DOCS)])) > 2
  np.testing.assert_allclose(docs, hf_embed(retriever.doc_sequences(DOCS)), atol=2e-5)
  queries = retriever.encode_queries(QUERIES, think=0)
  np.testing.assert_allclose(queries, hf_embed([s[0] for s in retriever.query_sequences(QUERIES)]), atol=2e-5)


def test_bfloat16_inference_stays_near_float32(model_dir, retriever):
  """`--dtype=bfloat16` (bfloat16 weights and compute; on a CPU through the projections' bfloat16 kernel): the
  unit vectors stay within bfloat16's precision of float32's, and come back as float32."""
  half = Retriever.from_pretrained(model_dir, dtype="bfloat16", tokens_per_batch=512)
  assert half.cfg.dtype == "bfloat16"
  docs16, docs32 = half.encode_docs(DOCS), retriever.encode_docs(DOCS)
  assert docs16.dtype == np.float32 and docs16.shape == docs32.shape
  assert np.min(np.sum(docs16 * docs32, axis=1)) > 0.99


def test_thoughts_are_generated_ids_appended_without_retokenizing(retriever):
  s = retriever.special
  thoughts = retriever.think(QUERIES, k=3, temperature=1.0, max_new_tokens=6, rng=7)
  assert [len(t) for t in thoughts] == [3, 3, 3]
  assert thoughts == retriever.think(QUERIES, k=3, temperature=1.0, max_new_tokens=6, rng=7)  # same key, same ids
  assert thoughts != retriever.think(QUERIES, k=3, temperature=1.0, max_new_tokens=6, rng=8)
  # The same ids straight from the generator: think only cuts them before EOS.
  prefixes = [retriever.query_sequences([q])[0][0][:-1] for q in QUERIES]
  raw = retriever.generator.generate([p for p in prefixes for _ in range(3)], max_new_tokens=6, temperature=1.0,
                                     top_p=0.9, rng=jax.random.fold_in(jax.random.key(7), 0))
  flat = [t for per_query in thoughts for t in per_query]
  for ids, generated in zip(flat, raw):
    assert generated[:len(ids)] == ids and s.eos not in ids and 1 <= len(generated) <= 6
  for prefix, per_query, sequences in zip(prefixes, thoughts, retriever.query_sequences(QUERIES, thoughts)):
    for thought, seq in zip(per_query, sequences):
      assert seq == prefix + thought + ([s.eos] if thought else []) + [s.emb]


def test_k_thoughts_average_the_separately_embedded_sequences(retriever, hf_embed):
  vectors = retriever.encode_queries(QUERIES, think=3, sampling=SAMPLING, rng=11)
  thoughts = retriever.think(QUERIES, 3, SAMPLING.temperature, SAMPLING.top_p, SAMPLING.max_new_tokens, rng=11)
  for vector, sequences in zip(vectors, retriever.query_sequences(QUERIES, thoughts)):
    assert len({tuple(x) for x in sequences}) > 1  # distinct thoughts, so the mean is not one vector
    mean = hf_embed(sequences).mean(axis=0)
    np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=2e-5)
  np.testing.assert_array_equal(vectors, retriever.encode_queries(QUERIES, think=3, sampling=SAMPLING, rng=11))
  assert not np.allclose(vectors, retriever.encode_queries(QUERIES, think=0), atol=1e-3)


def test_search_is_brute_force_and_drops_self_hits(retriever):
  ids = [f"d{i}" for i in range(len(DOCS))]
  texts = [f"#{i} {t}" for i, t in enumerate(DOCS)]  # distinct docs (before truncation), so scores are distinct
  retriever.index(ids, texts, backend="exact")
  scores = retriever.encode_queries(QUERIES, think=0) @ retriever.encode_docs(texts).T
  hits = retriever.search(QUERIES, k=4)
  for row, query_hits in zip(scores, hits):
    assert [d for d, _ in query_hits] == [ids[i] for i in np.argsort(-row)[:4]]
    np.testing.assert_allclose([s for _, s in query_hits], np.sort(row)[::-1][:4], atol=1e-5)
  top = [h[0][0] for h in hits]
  dropped = retriever.search(QUERIES, k=4, self_hit_ids=top)
  assert all(t not in [d for d, _ in h] and len(h) == 4 for t, h in zip(top, dropped))


def test_doc_embeddings_are_cached_by_checkpoint_texts_and_settings(model_dir, retriever, tmp_path):
  first = retriever.encode_docs(DOCS, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("*.npy"))) == 1
  np.testing.assert_array_equal(np.load(next(tmp_path.glob("*.npy"))), first)
  np.testing.assert_array_equal(retriever.encode_docs(DOCS, cache_dir=tmp_path), first)
  retriever.encode_docs(DOCS[:2], cache_dir=tmp_path)
  other = Retriever(retriever.cfg, retriever.embedder.params, retriever.tokenizer, fingerprint="another checkpoint")
  other.encode_docs(DOCS, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("*.npy"))) == 3


def test_bad_inputs(retriever, tmp_path):
  with pytest.raises(ValueError, match="query 1 is empty"):
    retriever.encode_queries(["fine", "  "])
  with pytest.raises(ValueError, match="document 0 is empty"):
    retriever.encode_docs([""])
  with pytest.raises(TypeError, match="one string"):
    retriever.encode_queries("a query")
  with pytest.raises(ValueError, match="empty corpus"):
    retriever.index([], [])
  with pytest.raises(ValueError, match="duplicate doc ids"):
    retriever.index(["a", "a"], ["x", "y"])
  with pytest.raises(ValueError, match="think must be >= 0"):
    retriever.encode_queries(["q"], think=-1)
  fresh = Retriever(retriever.cfg, retriever.embedder.params, retriever.tokenizer)
  with pytest.raises(ValueError, match="no corpus indexed"):
    fresh.search(["q"])
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
    Retriever.from_pretrained(tmp_path / "missing")
