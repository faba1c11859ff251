"""The README.md model card of an exported retriever: how to think, how to embed, and code that does both.

The card's Python snippets are executed by the export tests against o1jax, so what the card tells users is what
o1jax computes: `snippet` (transformers + torch: think and embed), `st_snippet` (sentence-transformers: documents
and queries without thinking) and, for LoRA runs, `peft_snippet` (the base model with the PEFT adapter, which then
thinks and embeds with `snippet`'s functions).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from o1jax.model import ModelConfig
from o1jax.tokenizer import SPECIAL_TOKENS, SpecialIds


@dataclasses.dataclass(frozen=True)
class AdapterFacts:
  """The PEFT adapter of a LoRA run."""
  rank: int
  alpha: float
  targets: tuple[str, ...]
  full_embeddings: bool  # the adapter holds whole embedding matrices, not only the special tokens' rows
  base_model: str | None  # the Hugging Face directory the run started from; None: the export's base/


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
  adapter: AdapterFacts | None = None

  @classmethod
  def of(cls, cfg: ModelConfig, tokenizer: Any, thinking: Any, source: str,
         adapter: AdapterFacts | None = None) -> CardFacts:
    """Facts of a model config, its tokenizer and the thinking settings (an `o1jax.export.Thinking`)."""
    adds_bos = SpecialIds.from_tokenizer(tokenizer).bos is not None
    return cls(cfg.family, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size,
               tokenizer.bos_token if adds_bos else None, tokenizer.eos_token, thinking.num_thoughts,
               thinking.temperature, thinking.top_p, thinking.max_new_tokens, source, adapter)


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
  """k sampled thoughts (token ids, cut before EOS)."""
  out = model.generate(torch.tensor([prefix]), attention_mask=torch.ones(1, len(prefix), dtype=torch.long),
                       do_sample=True, temperature={temperature}, top_p={top_p}, max_new_tokens={max_new_tokens},
                       num_return_sequences=k, eos_token_id=EOS, pad_token_id=EOS)
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


ST_SNIPPET = '''\
from sentence_transformers import SentenceTransformer

st_model = SentenceTransformer("{path}")  # no remote code: the files are sentence-transformers' own modules
doc_vectors = st_model.encode_document(["Tides The Moon's gravity ..."])  # f"{{title}} {{text}}".strip()
query_vectors = st_model.encode_query(["what causes tides"])  # without thinking
st_scores = query_vectors @ doc_vectors.T
'''

PEFT_SNIPPET = '''\
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.float32)
# Rows for the four special tokens: the adapter replaces whatever the resize puts in them.
base.resize_token_embeddings(max(base.get_input_embeddings().num_embeddings, len(tok)), mean_resizing=False)
model = PeftModel.from_pretrained(base, "{path}/adapter").eval()
'''


def snippet(path: str, thinking: Any) -> str:
  """The card's transformers code for the model directory (or hub id) `path`; `thinking` has the sampling
  settings (num_thoughts, temperature, top_p, max_new_tokens), e.g. an `o1jax.export.Thinking` or `CardFacts`."""
  return SNIPPET.format(path=path, special=list(SPECIAL_TOKENS), k=thinking.num_thoughts,
                        temperature=thinking.temperature, top_p=thinking.top_p,
                        max_new_tokens=thinking.max_new_tokens)


def st_snippet(path: str) -> str:
  """The card's sentence-transformers code for the export `path`."""
  return ST_SNIPPET.format(path=path)


def peft_snippet(path: str, base: str) -> str:
  """The card's code that replaces `snippet`'s `model` with the base model `base` and the adapter of `path`."""
  return PEFT_SNIPPET.format(path=path, base=base)


def _adapter_section(facts: CardFacts, path: str) -> str:
  adapter = facts.adapter
  if adapter is None:
    return ""
  if adapter.full_embeddings:
    rows = "the trained embedding matrices (the run trained them whole; PEFT `modules_to_save`)"
  else:
    rows = ("the trained rows of the four special tokens in the embeddings and the LM head (PEFT trainable tokens, "
            "`trainable_token_indices`)")
  if adapter.base_model is None:
    base, where = f"{path}/base", ("`base/`: the run's backbone (it did not start from a Hugging Face directory), "
                                   "with the four special tokens")
  else:
    base, where = adapter.base_model, f"`{adapter.base_model}`, the Hugging Face directory the run started from"
  return f"""
## PEFT adapter

`adapter/` is the run as a PEFT LoRA adapter: rank {adapter.rank}, alpha {adapter.alpha:g} on
{", ".join(adapter.targets)}, and {rows}. It applies to the base model with its vocabulary grown to the tokenizer's
size, whatever the grown rows hold. The base model: {where}. With the adapter, the base thinks and embeds exactly
as the merged model in this directory; run this after the code above, then use its functions:

```python
{peft_snippet(path, base)}```
"""


def render(facts: CardFacts, path: str) -> str:
  """The README.md text; its code loads the model from `path`."""
  bos = f"`{facts.bos_token}` (the tokenizer prepends it)" if facts.bos_token else "none (the tokenizer adds none)"
  code = snippet(path, facts)
  return f"""---
library_name: transformers
pipeline_tag: feature-extraction
tags:
- o1jax
- o1-embedder
- retrieval
- dense-retrieval
- sentence-transformers
---

# O1 Embedder retriever ({facts.family}, exported by o1jax)

A decoder-only {facts.family} model ({facts.num_hidden_layers} layers, hidden size {facts.hidden_size}, vocabulary
{facts.vocab_size}) trained with o1jax to **think before it embeds** (O1 Embedder, arXiv 2502.07555): for a query it
first generates a short thought (a plausible answer), then embeds the query together with that thought. Documents
are embedded directly, without thinking. Exported from the o1jax checkpoint `{facts.source}` (LoRA adapters, if
any, merged into the weights{"; also as a PEFT adapter in `adapter/`" if facts.adapter else ""}).

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

## With sentence-transformers

`SentenceTransformer("{path}")` loads this directory with sentence-transformers' own modules (the model through
`AutoModel`, last-token pooling, normalization; no remote code). `encode_document` embeds `[BOS] title text <emb>`
(pass `f"{{title}} {{text}}".strip()`; at most 512 tokens with `<emb>`), `encode_query` embeds the query **without
thinking**, `[BOS] <query> q </query> <thought> <emb>` (q cut to 32 tokens): the same vectors as the code above.

```python
{st_snippet(path)}```

To **think first**, generate with transformers: sentence-transformers loads the model without its LM head and
cannot generate. `embed_query(query)` above thinks and embeds; its vectors live in the same space as the document
vectors of `encode_document`, so sentence-transformers can index the corpus and thinking queries search it.
{_adapter_section(facts, path)}"""
