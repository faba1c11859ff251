"""sentence-transformers files of an export: `SentenceTransformer(dir)` embeds as o1jax does, without remote code.

  modules.json: Transformer (the exported weights through `AutoModel`: final hidden states, after the final norm)
                -> Pooling (last token) -> Normalize

Documents (`encode_document`, and `encode`) become `[BOS] title text <emb>` and queries (`encode_query`) the
no-thought form `[BOS] <query> q </query> <thought> <emb>` (METHOD §2). A chat template that branches on
sentence-transformers' `task` renders both; it reaches the tokenizer through `processor_kwargs`, so the exported
tokenizer files (and `tokenizer.apply_chat_template` in transformers) keep the backbone's own template.

Truncation: sentence-transformers cuts the rendered ids to `document_length` / `query_length` and writes the
template's tail (`<emb>`, or `</query> <thought> <emb>`) back over the last positions, which is o1jax's cut: the
document text to `doc - 1 - |BOS|` tokens, the query text to `query` tokens.

Where the text meets a special token, tokenizers differ: a byte-level BPE (Llama 3, Qwen2, SmolLM2) tokenizes the
text after `<query>` as it tokenizes the text alone, a SentencePiece-style Metaspace tokenizer (Mistral, Llama 2)
only when one space separates them. The template is the variant whose rendering reproduces o1jax's ids on probe
texts, checked at export.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from o1jax import templates
from o1jax.tokenizer import SPECIAL_TOKENS, SpecialIds

TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
# Rendered by the chat template and tokenized like every input; none carries a special token or a leading space.
PROBES = ("what causes tides", "The Moon's gravity pulls the oceans: tides (2 a day, 12.4 h apart).",
          "Scurvy is caused by a lack of vitamin C")


class TemplateError(ValueError):
  """No chat template variant renders o1jax's sequences with this tokenizer."""


def _template(bos: bool, query_sep: str, doc_sep: str) -> str:
  query, query_end, thought, emb = SPECIAL_TOKENS
  prefix = "{{ bos_token }}" if bos else ""
  return ("{%- set text = messages[-1]['content'] -%}"
          f"{{%- if task == 'query' -%}}{prefix}{query}{query_sep}{{{{ text }}}}{query_end}{thought}{emb}"
          f"{{%- else -%}}{prefix}{doc_sep}{{{{ text }}}}{emb}{{%- endif -%}}")


def _rendered(tokenizer: Any, template: str, text: str, task: str) -> list[int]:
  return tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=template, task=task,
                                       tokenize=True, return_dict=True)["input_ids"]


def chat_template(tokenizer: Any, lengths: templates.Lengths) -> str:
  """The template whose renderings equal o1jax's query (no thought) and document ids on `PROBES`."""
  special = SpecialIds.from_tokenizer(tokenizer)
  bos = special.bos is not None

  def expected(text: str, task: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if task == "query":
      return templates.query_sequence(ids, None, special, lengths)[0]
    return templates.document_sequence(ids, special, lengths.doc)

  seps = {}
  for task in ("query", "document"):
    for sep in ("", " "):
      template = _template(bos, sep, sep)
      if all(_rendered(tokenizer, template, text, task) == expected(text, task) for text in PROBES):
        seps[task] = sep
        break
    else:
      raise TemplateError(f"no chat template renders o1jax's {task} ids for this tokenizer "
                          f"({type(tokenizer).__name__}); e.g. {PROBES[0]!r} renders "
                          f"{_rendered(tokenizer, _template(bos, '', ''), PROBES[0], task)}, o1jax has "
                          f"{expected(PROBES[0], task)}")
  return _template(bos, seps["query"], seps["document"])


def write(out: pathlib.Path, tokenizer: Any, hidden_size: int, lengths: templates.Lengths) -> None:
  """Writes the sentence-transformers files into the exported model directory `out`.

  Raises:
    TemplateError: no chat template reproduces o1jax's sequences with this tokenizer.
  """
  template = chat_template(tokenizer, lengths)
  special = SpecialIds.from_tokenizer(tokenizer)
  bos = int(special.bos is not None)
  processor_kwargs: dict[str, Any] = {
      "chat_template": template,
      # `encode` without a task truncates like a document.
      "model_max_length": lengths.doc,
  }
  if tokenizer.pad_token is None:
    # Padding is masked, so any token pads; o1jax pads with EOS when the tokenizer has no pad token.
    processor_kwargs["pad_token"] = tokenizer.eos_token
  (out / "modules.json").write_text(json.dumps([
      {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING},
      {"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE},
  ], indent=2) + "\n")
  output = {"method": "forward", "method_output_name": "last_hidden_state"}
  (out / "sentence_bert_config.json").write_text(json.dumps({
      "transformer_task": "feature-extraction",
      # Text is rendered through the chat template ("message"), whose content is the plain text ("flat").
      "modality_config": {"text": output, "message": {**output, "format": "flat"}},
      "module_output_name": "token_embeddings",
      "processor_kwargs": processor_kwargs,
      # The longest no-thought query: [BOS] <query> q </query> <thought> <emb>.
      "query_length": bos + lengths.query + 4,
      "document_length": lengths.doc,
  }, indent=2) + "\n")
  (out / "config_sentence_transformers.json").write_text(json.dumps({
      "model_type": "SentenceTransformer",
      # No prompts: the chat template alone makes a text a query or a document.
      "prompts": {"query": "", "document": ""},
      "default_prompt_name": None,
      "similarity_fn_name": "cosine",
  }, indent=2) + "\n")
  (out / "1_Pooling").mkdir()
  (out / "1_Pooling" / "config.json").write_text(json.dumps({
      "embedding_dimension": hidden_size, "pooling_mode": "lasttoken", "include_prompt": True}, indent=2) + "\n")
  (out / "2_Normalize").mkdir()
