"""The O1 Embedder as a retriever (METHOD §6): think, embed queries and documents, search an indexed corpus.

  retriever = Retriever.from_pretrained("exported_hf_dir")   # or an o1jax checkpoint directory
  retriever.index(doc_ids, doc_texts)
  hits = retriever.search(["what causes scurvy?"], k=10, think=3)

  # The same in steps, keeping what the model thought:
  thoughts = retriever.think(queries, k=3)                     # token ids, per query
  hits = retriever.search_vectors(retriever.encode_with_thoughts(queries, thoughts), k=10)
  texts = retriever.decode_thoughts(thoughts)                  # what it thought, as text

Queries are embedded from token ids only: `[BOS] <query> q </query> <thought>` + generated thought ids + EOS +
`<emb>` (METHOD §2), never decoded and re-tokenized. With `think=K` each query gets K sampled thoughts and its
vector is the mean of the K normalised query+thought vectors, re-normalised; `think=0` embeds the no-thought
form `<query> q </query> <thought> <emb>`. Documents are `[BOS] title text <emb>`, up to 512 tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
import os
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
import tqdm

from o1jax import templates
from o1jax.generate import Generator, Sampling
from o1jax.model import ModelConfig
from o1jax.retrieval import embedding_cache, loading, search as search_lib
from o1jax.retrieval.embedder import SequenceEmbedder
from o1jax.tokenizer import SpecialIds

# Models up to this size think on one device: token-by-token decoding of FSDP-sharded weights gathers every
# weight at every step, which costs more than it saves until a model no longer fits one device comfortably.
ONE_DEVICE_GENERATION_BYTES = 2 * 2**30
# METHOD §2 evaluation lengths: query text 32 tokens, query + thought 256, documents 512 (all with `<emb>`).
EVAL_LENGTHS = templates.Lengths(query=32, query_thought=256, doc=512)


def _key(rng: jax.Array | int) -> jax.Array:
  return jax.random.key(rng) if isinstance(rng, int) else rng


class Retriever:
  """An o1jax model with its tokenizer, set up for retrieval on all devices."""

  def __init__(self, cfg: ModelConfig, params: Any, tokenizer: Any, *, lengths: templates.Lengths = EVAL_LENGTHS,
               mesh: Mesh | None = None, fingerprint: str | None = None, tokens_per_batch: int = 16384,
               generate_batch: int = 64, generator: Any = None):
    """`fingerprint` names the weights for the on-disk document-embedding cache; None disables the cache.
    `generator` writes the thoughts: by default the model itself on this machine, or e.g. a
    `remote_generator.CompletionsGenerator` serving the exported model."""
    self.cfg, self.tokenizer, self.lengths = cfg, tokenizer, lengths
    self.special = SpecialIds.from_tokenizer(tokenizer)
    self.fingerprint = fingerprint
    self.embedder = SequenceEmbedder(cfg, params, mesh, tokens_per_batch)
    if generator is None:
      generation_params = self.embedder.params
      if sum(x.nbytes for x in jax.tree.leaves(generation_params)) <= ONE_DEVICE_GENERATION_BYTES:
        generation_params = jax.device_put(generation_params, self.embedder.mesh.devices.flat[0])
      # Stop at the tokenizer's EOS only: it is the token that ends thoughts in training (METHOD §2).
      generator = Generator(cfg, generation_params, eos_ids=(self.special.eos,), pad_id=self.special.pad)
    self.generator = generator
    self.generate_batch = generate_batch
    self._doc_ids: list[str] = []
    self._searcher: search_lib.Searcher | None = None

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32", **kwargs) -> Retriever:
    """An exported Hugging Face directory (config.json + safetensors) or an o1jax checkpoint directory."""
    cfg, params, tokenizer = loading.load_pretrained(path, dtype)
    kwargs.setdefault("fingerprint", loading.checkpoint_fingerprint(path))
    return cls(cfg, params, tokenizer, **kwargs)

  # ---------------------------------------------------------------- token ids

  def tokenize(self, texts: Sequence[str], what: str) -> list[list[int]]:
    """Token ids without the tokenizer's own specials (the templates add BOS); an empty text is an error."""
    if isinstance(texts, str):
      raise TypeError(f"{what}: expected a list of strings, got one string")
    for i, text in enumerate(texts):
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} {i} is empty")
    return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

  def query_sequences(self, queries: Sequence[str], thoughts: Sequence[Sequence[Sequence[int]]] | None = None
                      ) -> list[list[list[int]]]:
    """Per query, one embedded sequence per thought (`thoughts[i]` = query i's thought ids), or the one
    no-thought sequence when `thoughts` is None."""
    ids = self.tokenize(queries, "query")
    if thoughts is None:
      return [[templates.query_sequence(q, None, self.special, self.lengths)[0]] for q in ids]
    if len(thoughts) != len(ids):
      raise ValueError(f"{len(thoughts)} thought lists for {len(ids)} queries")
    return [[templates.query_sequence(q, t, self.special, self.lengths)[0] for t in ts] for q, ts in zip(ids, thoughts)]

  def doc_sequences(self, docs: Sequence[str]) -> list[list[int]]:
    return [templates.document_sequence(d, self.special, self.lengths.doc) for d in self.tokenize(docs, "document")]

  # ---------------------------------------------------------------- thinking and embedding

  def think(self, queries: Sequence[str], k: int = 3, temperature: float = Sampling.temperature,
            top_p: float = Sampling.top_p, max_new_tokens: int = Sampling.max_new_tokens,
            rng: jax.Array | int = 0, repetition_penalty: float = Sampling.repetition_penalty
            ) -> list[list[list[int]]]:
    """`k` sampled thoughts per query, as generated token ids (cut before EOS). Same rng, same thoughts."""
    if k < 1:
      raise ValueError(f"k must be >= 1 thoughts per query, got {k}")
    prompts = [templates.query_prefix(q, self.special, self.lengths) for q in self.tokenize(queries, "query")]
    flat = [p for p in prompts for _ in range(k)]
    key = _key(rng)
    thoughts: list[list[int]] = []
    # A bar only when there is more than one batch: API users thinking for a few queries see no output.
    with tqdm.tqdm(total=len(flat), desc="think", unit="thought", file=sys.stderr,
                   disable=len(flat) <= self.generate_batch) as progress:
      for n, start in enumerate(range(0, len(flat), self.generate_batch)):
        batch = flat[start:start + self.generate_batch]
        thoughts += self.generator.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                            top_p=top_p, rng=jax.random.fold_in(key, n),
                                            repetition_penalty=repetition_penalty)
        progress.update(len(batch))
    thoughts = [templates.thought_until_eos(t, self.special) for t in thoughts]
    return [thoughts[i * k:(i + 1) * k] for i in range(len(prompts))]

  def think_with(self, queries: Sequence[str], k: int, sampling: Sampling, rng: jax.Array | int = 0
                 ) -> list[list[list[int]]]:
    """`think` with the settings of a `Sampling`."""
    return self.think(queries, k, sampling.temperature, sampling.top_p, sampling.max_new_tokens, rng,
                      sampling.repetition_penalty)

  def decode_thoughts(self, thoughts: Sequence[Sequence[Sequence[int]]]) -> list[list[str]]:
    """`think`'s token ids as text, special tokens kept: the text of exactly what was embedded."""
    return [[self.tokenizer.decode(list(t), skip_special_tokens=False) for t in per_query] for per_query in thoughts]

  def embed_sequences(self, sequences: Sequence[Sequence[int]], desc: str | None = None) -> np.ndarray:
    return self.embedder.embed(sequences, desc)

  def encode_queries(self, queries: Sequence[str], think: int = 0, sampling: Sampling = Sampling(),
                     rng: jax.Array | int = 0) -> np.ndarray:
    """Unit query vectors [Q, D]: mean of `think` query+thought vectors, re-normalised (`think=0`: no thought)."""
    if think < 0:
      raise ValueError(f"think must be >= 0 thoughts per query, got {think}")
    if not think:
      return self.embed_sequences([s[0] for s in self.query_sequences(queries)])
    return self.encode_with_thoughts(queries, self.think_with(queries, think, sampling, rng))

  def encode_with_thoughts(self, queries: Sequence[str], thoughts: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Unit query vectors [Q, D] from given thought ids (`thoughts[i]`: query i's, as `think` returns them, at least
    one per query): the mean of each query's query+thought vectors, re-normalised."""
    counts = [len(per_query) for per_query in thoughts]
    if 0 in counts:
      raise ValueError(f"query {counts.index(0)} has no thought (every query needs at least one)")
    sequences = self.query_sequences(queries, thoughts)
    vectors = self.embed_sequences([s for per_query in sequences for s in per_query])
    starts = np.cumsum([0] + counts[:-1])
    mean = np.add.reduceat(vectors, starts, axis=0) / np.asarray(counts, np.float32)[:, None] if counts else vectors
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)

  def encode_docs(self, docs: Sequence[str], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Unit document vectors [N, D]; cached on disk by checkpoint, texts and settings when the weights have a
    fingerprint (`cache_dir` default: $O1JAX_CACHE or ~/.cache/o1jax)."""
    def encode(texts: Sequence[str]) -> np.ndarray:
      return self.embed_sequences(self.doc_sequences(texts), desc="embed documents")
    if self.fingerprint is None:
      return encode(docs)
    settings = ("o1jax-docs-v1", self.fingerprint, f"doc_tokens={self.lengths.doc}", self.cfg.dtype)
    return embedding_cache.cached_encode(encode, docs, settings, cache_dir)

  # ---------------------------------------------------------------- search

  def index(self, doc_ids: Sequence[str], docs: Sequence[str], backend: str = "auto", k: int = 1000,
            cache_dir: str | os.PathLike | None = None) -> None:
    """Embeds the corpus and builds the searcher (`backend`: auto | exact | scann)."""
    if len(doc_ids) != len(docs):
      raise ValueError(f"{len(doc_ids)} doc ids for {len(docs)} documents")
    if not docs:
      raise ValueError("empty corpus: nothing to index")
    if len(set(doc_ids)) != len(doc_ids):
      raise ValueError("duplicate doc ids in the corpus")
    self._doc_ids = list(doc_ids)
    self._searcher = search_lib.build_searcher(self.encode_docs(docs, cache_dir), backend, k)

  def search(self, queries: Sequence[str], k: int = 10, think: int = 0, sampling: Sampling = Sampling(),
             rng: jax.Array | int = 0, self_hit_ids: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
    """Top-k (doc id, score) per query, best first. `self_hit_ids[i]`: a doc id never returned for query i
    (ArguAna / Quora, where queries are also corpus documents)."""
    if self._searcher is None:  # before thinking, which may take hours
      raise ValueError("no corpus indexed: call index(doc_ids, docs) first")
    return self.search_vectors(self.encode_queries(queries, think, sampling, rng), k, self_hit_ids)

  def search_vectors(self, vectors: np.ndarray, k: int = 10, self_hit_ids: Sequence[str] | None = None
                     ) -> list[list[tuple[str, float]]]:
    """`search` for query vectors already encoded (`encode_queries`, `encode_with_thoughts`)."""
    if self._searcher is None:
      raise ValueError("no corpus indexed: call index(doc_ids, docs) first")
    if self_hit_ids is None:
      indices, scores = self._searcher.search(vectors, k)
    else:
      indices, scores = search_lib.search_without_self_hits(self._searcher, vectors, k, self_hit_ids, self._doc_ids)
    return [[(self._doc_ids[i], float(s)) for i, s in zip(row, row_scores) if i >= 0]
            for row, row_scores in zip(indices, scores)]
