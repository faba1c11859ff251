"""The README.md model card of an exported retriever: how to think, how to embed, and code that does both.

The card's Python snippet (`snippet`) is plain transformers + torch and is executed by the export test against
o1jax, so what the card tells users is what o1jax computes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from o1jax.model import ModelConfig
from o1jax.tokenizer import SPECIAL_TOKENS


@dataclasses.dataclass(frozen=True)
class CardFacts:
  """What the card states about one export."""
  family: str
  hidden_size: int
  num_hidden_layers: int
  vocab_size: int
  bos_token: str | None  # prepended by the tokenizer, or None
  eos_token: str
  num_thoughts: int
  temperature: float
  top_p: float
  max_new_tokens: int
  source: str

  @classmethod
  def of(cls, cfg: ModelConfig, tokenizer: Any, thinking: Any, source: str) -> CardFacts:
    """Facts of a model config, its tokenizer and the thinking settings (an `o1jax.export.Thinking`)."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return cls(cfg.family, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size,
               tokenizer.bos_token if adds_bos else None, tokenizer.eos_token, thinking.num_thoughts,
               thinking.temperature, thinking.top_p, thinking.max_new_tokens, source)


SNIPPET = '''\
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{path}"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
QUERY, QUERY_END, THOUGHT, EMB = tok.convert_tokens_to_ids({special})
EOS = tok.eos_token_id
# The BOS the tokenizer itself prepends (Llama, Mistral), none for tokenizers that add none (Qwen).
BOS = [tok.bos_token_id] if tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id] else []


def query_prefix(query):
  """[BOS] <query> q </query> <thought> as token ids (q cut to 32 tokens)."""
  return BOS + [QUERY] + tok(query, add_special_tokens=False).input_ids[:32] + [QUERY_END, THOUGHT]


@torch.no_grad()
def think(prefix, k={k}):
  """k sampled thoughts (token ids, cut before EOS); settings from generation_config.json."""
  out = model.generate(torch.tensor([prefix]), attention_mask=torch.ones(1, len(prefix), dtype=torch.long),
                       num_return_sequences=k)
  thoughts = []
  for row in out[:, len(prefix):].tolist():
    thoughts.append(row[:row.index(EOS)] if EOS in row else row)
  return thoughts


@torch.no_grad()
def embed(ids):
  """L2-normalised final hidden state (after the final norm) at the last token, which is <emb>."""
  hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
  return F.normalize(hidden[0, -1].float(), dim=-1)


def query_sequence(prefix, thought):
  """Prefix + thought + EOS, cut to 255 tokens, + <emb>: ids, never decoded and re-tokenized."""
  return (prefix + thought + [EOS])[:255] + [EMB]


def embed_query(query, k={k}):
  """Mean of the normalised embeddings of the query with each of k thoughts."""
  prefix = query_prefix(query)
  return torch.stack([embed(query_sequence(prefix, t)) for t in think(prefix, k)]).mean(0)


def embed_document(title, text):
  """[BOS] title text (511 tokens at most) <emb>."""
  ids = tok(f"{{title}} {{text}}".strip(), add_special_tokens=False).input_ids
  return embed((BOS + ids)[:511] + [EMB])


scores = embed_query("what causes tides") @ torch.stack([embed_document("Tides", "The Moon's gravity ...")]).T
'''


def snippet(path: str, num_thoughts: int) -> str:
  """The card's transformers code for the model directory (or hub id) `path`."""
  return SNIPPET.format(path=path, special=list(SPECIAL_TOKENS), k=num_thoughts)


def render(facts: CardFacts, path: str) -> str:
  """The README.md text; its code loads the model from `path`."""
  bos = f"`{facts.bos_token}` (the tokenizer prepends it)" if facts.bos_token else "none (the tokenizer adds none)"
  code = snippet(path, facts.num_thoughts)
  return f"""---
library_name: transformers
pipeline_tag: feature-extraction
tags:
- o1jax
- o1-embedder
- retrieval
- dense-retrieval
---

# O1 Embedder retriever ({facts.family}, exported by o1jax)

A decoder-only {facts.family} model ({facts.num_hidden_layers} layers, hidden size {facts.hidden_size}, vocabulary
{facts.vocab_size}) trained with o1jax to **think before it embeds** (O1 Embedder, arXiv 2502.07555): for a query it
first generates a short thought (a plausible answer), then embeds the query together with that thought. Documents
are embedded directly, without thinking. Exported from the o1jax checkpoint `{facts.source}` (LoRA adapters, if
any, merged into the weights).

Special tokens (in the tokenizer): `<query>`, `</query>`, `<thought>`, `<emb>`. BOS: {bos}. EOS: `{facts.eos_token}`.

## How to think
1. Build the prefix **as token ids**: `[BOS] <query> q </query> <thought>`, with the query text `q` tokenized
   without special tokens and cut to 32 tokens.
2. Sample k = {facts.num_thoughts} thoughts from it: temperature {facts.temperature}, top-p {facts.top_p}, at most
   {facts.max_new_tokens} new tokens, stopping at EOS (`generation_config.json` holds these settings; pass
   `num_return_sequences={facts.num_thoughts}`).
3. For each thought: prefix + thought ids + EOS (cut to 255 tokens) + `<emb>`. Append ids; do not decode the
   thought and re-tokenize the text (that adds a second BOS and shifts whitespace).

## How to embed
- The embedding is the **final hidden state after the final norm** at the `<emb>` token (transformers:
  `hidden_states[-1]` with `output_hidden_states=True`, the same as the base model's `last_hidden_state`),
  **L2-normalized**. No pooling, no projection head.
- Query: the mean of the normalized embeddings of its k thought sequences (renormalizing does not change rankings).
- Document: `[BOS] title text <emb>` (title and text joined by one space; at most 512 tokens with `<emb>`).
- Score: inner product.

```python
{code}```
"""
