"""A tiny retrieval dataset the project generates itself, in which a thought really helps retrieval.

World: `num_topics` topics, each with `docs_per_topic` documents; document (t, j) is about entity e = t*D + j:
  document:  "t{t} e{e} w.. w.."            topic word, entity word, random filler words
  query:     "t{t} c{clue(e)} v.."          topic word, a clue word, query-only fillers; `clue` is a fixed bijection
  thought:   "e{e} t{t} ..."                names the entity (and topic) the clue stands for

Alone, a query shares only its topic word with the documents, so it matches every document of its topic
equally: lexically ambiguous, and the hard negatives are exactly the other documents of the topic. Its thought
names the entity word that occurs only in the positive document. The clue -> entity map is a learnable
function of the query, so behavior cloning can learn to produce the thought. Everything is a deterministic
function of the knobs and the seed.

The tokenizer is word-level, built by the code (no download): `<pad>`, `</s>` (EOS), `<s>` (BOS, prepended like
Llama's), `<unk>`, the world's words, then the four O1 Embedder special tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers, processors
import transformers

from o1jax.tokenizer import SPECIAL_TOKENS


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  num_topics: int = 8
  docs_per_topic: int = 8
  queries_per_doc: int = 4
  filler_words: int = 64
  doc_fillers: int = 6
  query_fillers: int = 2
  query_filler_words: int = 16
  seed: int = 0


def _words(spec: SyntheticSpec) -> list[str]:
  entities = spec.num_topics * spec.docs_per_topic
  return ([f"t{i}" for i in range(spec.num_topics)] + [f"e{i}" for i in range(entities)] +
          [f"c{i}" for i in range(entities)] + [f"w{i}" for i in range(spec.filler_words)] +
          [f"v{i}" for i in range(spec.query_filler_words)])


def make_records(spec: SyntheticSpec) -> list[dict[str, Any]]:
  """Training records {query_id, query, thought, positives, negatives}, in a fixed order."""
  if spec.num_topics < 1 or spec.docs_per_topic < 2:
    raise ValueError(f"synthetic data needs num_topics >= 1 and docs_per_topic >= 2, got {spec}")
  rng = np.random.default_rng(spec.seed)
  entities = spec.num_topics * spec.docs_per_topic
  clue = rng.permutation(entities)
  docs = [" ".join([f"t{e // spec.docs_per_topic}", f"e{e}"] +
                   [f"w{w}" for w in rng.integers(spec.filler_words, size=spec.doc_fillers)])
          for e in range(entities)]
  records = []
  for e in range(entities):
    topic = e // spec.docs_per_topic
    same_topic = [docs[o] for o in range(topic * spec.docs_per_topic, (topic + 1) * spec.docs_per_topic) if o != e]
    for k in range(spec.queries_per_doc):
      fillers = [f"v{w}" for w in rng.integers(spec.query_filler_words, size=spec.query_fillers)]
      records.append({
          "query_id": f"q{e}-{k}",
          "query": " ".join([f"t{topic}", f"c{clue[e]}"] + fillers),
          "thought": f"e{e} t{topic}",
          "positives": [docs[e]],
          "negatives": same_topic,
      })
  return records


def make_tokenizer(spec: SyntheticSpec) -> transformers.PreTrainedTokenizerFast:
  """Word-level tokenizer over the world's words, with BOS/EOS/PAD/UNK and the O1 Embedder special tokens."""
  base = ["<pad>", "</s>", "<s>", "<unk>"]
  vocab = {w: i for i, w in enumerate(base + _words(spec) + list(SPECIAL_TOKENS))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
      extra_special_tokens=list(SPECIAL_TOKENS))
