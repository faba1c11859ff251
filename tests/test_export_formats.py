"""The export's PEFT adapter and sentence-transformers files, on small random models, against the libraries that
load them (peft, sentence-transformers), for the layouts one trained run cannot cover (tests/test_export.py
exports a real run): tied and untied LM heads, adapters with the special tokens' rows and with whole embedding
matrices, and tokenizers of every kind the supported families use (byte-level BPE with and without BOS,
SentencePiece-style Metaspace), with texts long enough to be cut.
"""
import jax
import numpy as np
import peft
import pytest
import sentence_transformers
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from o1jax import lora
from o1jax.convert import layout, save_hf
from o1jax.data import synthetic
from o1jax.export import peft_adapter, sbert
from o1jax.model import ModelConfig
from o1jax.retrieval.retriever import EVAL_LENGTHS, Retriever
from o1jax.tokenizer import SPECIAL_TOKENS, SpecialIds, add_special_tokens

ATOL = 1e-5
CORPUS = ["The Moon's gravity pulls the oceans: two tides a day, 12.4 hours apart.",
          "Scurvy is caused by a lack of vitamin C; sailors carried limes from 1795 on.",
          "what causes tides", "which vitamin prevents scurvy", "0 1 2 3 4 5 6 7 8 9"] * 20


def model_config(vocab_size: int, tied: bool) -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)


def synthetic_tokenizer():
  return synthetic.make_tokenizer(synthetic.SyntheticSpec())


def trained_tokenizer(pre_tokenizer: str, bos: bool):
  """A BPE tokenizer trained on CORPUS: byte-level (Llama 3, Qwen2, SmolLM2) or Metaspace (Mistral, Llama 2)."""
  tok = tokenizers.Tokenizer(models.BPE())
  if pre_tokenizer == "bytelevel":
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder, alphabet = decoders.Metaspace(replacement="▁", prepend_scheme="first"), []
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=alphabet))
  if bos:
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None,
                                              eos_token="</s>")


def with_special_tokens(tokenizer, tied: bool, seed: int = 0):
  """(ModelConfig, params) of a random model for `tokenizer`, which gets the four special tokens. Drawn with numpy
  in the shapes of `init_params` (compiling it costs more than these tests)."""
  cfg = model_config(len(tokenizer), tied)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), layout.expected_shapes(cfg))
  cfg, params, _ = add_special_tokens(tokenizer, cfg, params)
  return cfg, jax.tree.map(np.asarray, params)


# ------------------------------------------------------------------------------------------------ PEFT adapter


def random_adapters(cfg: ModelConfig, params: dict, lora_cfg: lora.LoraConfig) -> dict:
  """LoRA adapters with nonzero B (a freshly initialised B is zero and would hide a wrong layout)."""
  adapters = jax.tree.map(np.asarray, lora.init(params, lora_cfg, jax.random.key(1)))
  rng = np.random.default_rng(2)
  for modules in adapters["layers"].values():
    for adapter in modules.values():
      adapter[lora.B] = rng.normal(0, 0.2, adapter[lora.B].shape).astype(np.float32)
  return adapters


def scrambled(params: dict, rows: slice | list[int], seed: int) -> dict:
  """`params` with the given rows of the embeddings and an untied LM head replaced by noise: a base model whose
  vocabulary was grown (or whose embeddings were not trained) never has the run's values in them."""
  rng = np.random.default_rng(seed)
  out = dict(params)
  embedding = params["embed_tokens"]["embedding"].copy()
  embedding[rows] = rng.normal(0, 1, embedding[rows].shape)
  out["embed_tokens"] = {"embedding": embedding}
  if "lm_head" in params:
    kernel = params["lm_head"]["kernel"].copy()
    kernel[:, rows] = rng.normal(0, 1, kernel[:, rows].shape)
    out["lm_head"] = {"kernel": kernel}
  return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("full_embeddings", [False, True], ids=["token_rows", "full_embeddings"])
def test_peft_adapter_on_a_base_without_the_run_rows_equals_the_merged_model(tmp_path, tied, full_embeddings):
  tokenizer = synthetic_tokenizer()
  cfg, params = with_special_tokens(tokenizer, tied)
  special = SpecialIds.from_tokenizer(tokenizer)
  ids = [special.query, special.query_end, special.thought, special.emb]
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
  adapters = random_adapters(cfg, params, lora_cfg)
  merged = jax.tree.map(np.asarray, lora.merge(params, adapters, lora_cfg))
  save_hf(cfg, merged, tmp_path / "merged", tokenizer=tokenizer)
  save_hf(cfg, scrambled(params, slice(None) if full_embeddings else ids, seed=3), tmp_path / "base")
  peft_adapter.save_adapter(tmp_path / "adapter", cfg, params, adapters, lora_cfg, tokenizer, ids, full_embeddings,
                            str(tmp_path / "base"), "float32")

  config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
  assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8.0, set(lora.TARGETS))
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
  model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  batch = torch.tensor([[2, special.query, 5, 79, 206, special.query_end, special.thought, 1, special.emb],
                        [2, 9, 17, special.emb, special.thought, 40, 41, special.query, special.query_end]])
  with torch.no_grad():
    want = reference(batch, output_hidden_states=True)
    got = model(batch, output_hidden_states=True)
  torch.testing.assert_close(got.hidden_states[-1], want.hidden_states[-1], rtol=0, atol=ATOL)
  torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=ATOL)
  with model.disable_adapter(), torch.no_grad():
    assert (model(batch).logits - want.logits).abs().max() > 100 * ATOL  # the adapter is what makes them equal


# ------------------------------------------------------------------------------------------------ sentence-transformers


TOKENIZERS = {
    "synthetic_wordlevel": synthetic_tokenizer,
    "bytelevel_bos": lambda: trained_tokenizer("bytelevel", bos=True),
    "bytelevel_no_bos": lambda: trained_tokenizer("bytelevel", bos=False),
    "metaspace_bos": lambda: trained_tokenizer("metaspace", bos=True),
}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_sentence_transformers_encodes_documents_and_queries_as_o1jax(tmp_path, kind):
  tokenizer = TOKENIZERS[kind]()
  cfg, params = with_special_tokens(tokenizer, tied=kind == "bytelevel_no_bos")
  out = save_hf(cfg, params, tmp_path / "model", tokenizer=tokenizer)
  sbert.write(out, tokenizer, cfg.hidden_size, EVAL_LENGTHS)
  # Queries above 32 tokens and documents above 512 are cut. The synthetic word-level tokenizer has no digits,
  # which sentence-transformers' tail detection (it renders "0" and "1 2 3 4") needs, so its texts stay short.
  if kind == "synthetic_wordlevel":
    records = synthetic.make_records(synthetic.SyntheticSpec())[:5]
    queries, docs = [r["query"] for r in records], [r["positives"][0] for r in records]
  else:
    queries, docs = CORPUS[2:4] + [" ".join(CORPUS[:2] * 3)], CORPUS[:2] + [" ".join(CORPUS[:5] * 20)]
  retriever = Retriever(cfg, params, tokenizer, fingerprint=None)
  model = sentence_transformers.SentenceTransformer(str(out), device="cpu")

  if kind != "synthetic_wordlevel":
    bos = int(kind != "bytelevel_no_bos")
    assert max(len(s[0]) for s in retriever.query_sequences(queries)) == bos + EVAL_LENGTHS.query + 4
    assert max(len(s) for s in retriever.doc_sequences(docs)) == EVAL_LENGTHS.doc
  for task, texts, sequences in (("query", queries, [s[0] for s in retriever.query_sequences(queries)]),
                                 ("document", docs, retriever.doc_sequences(docs))):
    features = model[0].preprocess(texts, task=task)
    rendered = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]
    assert rendered == sequences, task
  np.testing.assert_allclose(model.encode_document(docs), retriever.encode_docs(docs), rtol=0, atol=1e-4)
  np.testing.assert_allclose(model.encode_query(queries), retriever.encode_queries(queries), rtol=0, atol=1e-4)
  np.testing.assert_allclose(model.encode(docs), retriever.encode_docs(docs), rtol=0, atol=1e-4)


def test_metaspace_query_text_is_rendered_after_one_space_and_bytelevel_without():
  query, query_end = SPECIAL_TOKENS[:2]
  for kind, sep in (("metaspace_bos", " "), ("bytelevel_bos", "")):
    tokenizer = TOKENIZERS[kind]()
    tokenizer.add_special_tokens({"extra_special_tokens": list(SPECIAL_TOKENS)})
    template = sbert.chat_template(tokenizer, EVAL_LENGTHS)
    assert f"{query}{sep}{{{{ text }}}}{query_end}" in template, (kind, template)


def test_a_tokenizer_that_no_template_fits_is_refused():
  tokenizer = trained_tokenizer("metaspace", bos=True)
  # `<query>` swallows the whitespace after it: the text after it tokenizes as it never does alone (no leading
  # "▁"), with or without a space in the template.
  tokenizer.add_special_tokens({"extra_special_tokens": [
      tokenizers.AddedToken(token, rstrip=token == SPECIAL_TOKENS[0], special=True) for token in SPECIAL_TOKENS]})
  with pytest.raises(sbert.TemplateError, match="no chat template renders o1jax's query ids"):
    sbert.chat_template(tokenizer, EVAL_LENGTHS)
