"""The real small model: SmolLM2-135M-Instruct from the shared GGUF, o1jax against transformers' own GGUF loader."""
import jax
import numpy as np
import pytest
import torch
import transformers

from o1jax.convert import layout, load_gguf
from o1jax.model import Decoder
from o1jax.tokenizer import load_tokenizer

SENTENCES = (
    "The capital of France is Paris.",
    "Dense retrievers embed queries and documents into one vector space, then search by inner product.",
    "What is the boiling point of water at sea level?",
)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
  """(cfg, params, tokenizer, torch_model): o1jax's import and transformers' float32 model of the same file."""
  cfg, params = load_gguf(smollm2_gguf)
  tokenizer = load_tokenizer(smollm2_gguf)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
  return cfg, params, tokenizer, torch_model


def test_config_matches_transformers(smollm2):
  cfg, _, _, torch_model = smollm2
  hf = torch_model.config
  assert (cfg.family, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.vocab_size == hf.vocab_size == 49152
  assert cfg.tie_word_embeddings and hf.tie_word_embeddings
  assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
  assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)


def test_dequantized_tensors_equal_transformers(smollm2):
  """Same de-quantization and the same undoing of llama.cpp's Q/K permutation: bit-identical weights."""
  cfg, params, _, torch_model = smollm2
  state = torch_model.state_dict()
  for e in layout.entries(cfg):
    np.testing.assert_array_equal(layout.hf_tensor(params, e), state[e.hf_name].numpy(), err_msg=e.hf_name)


def test_logits_match_transformers_on_real_text(smollm2):
  cfg, params, tokenizer, torch_model = smollm2
  tokenizer.padding_side = "left"
  batch = tokenizer(list(SENTENCES), return_tensors="np", padding=True)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert (mask == 0).any()  # the batch really is padded
  positions = np.clip(mask.cumsum(-1) - 1, 0, None)
  with torch.no_grad():
    want = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits.numpy()
  model = Decoder(cfg)

  @jax.jit
  def logits(params, ids, positions, mask):
    return model.apply({"params": params}, model.apply({"params": params}, ids, positions, mask),
                       method=Decoder.logits)

  got = np.asarray(logits(params, ids, positions, mask))
  real = mask.astype(bool)
  relative = np.abs(got - want)[real].max() / np.abs(want[real]).max()
  assert relative <= 1e-3, f"max|diff| / max|ref| = {relative:.3g}"
  # The model is a real one: it predicts "Paris" after "The capital of France is".
  paris = tokenizer(" Paris")["input_ids"][0]
  row = 0
  before_paris = np.flatnonzero(ids[row] == paris)[0] - 1
  assert got[row, before_paris].argmax() == paris
