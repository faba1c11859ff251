"""The real small model: SmolLM2-135M-Instruct from the shared GGUF, o1jax against transformers' own GGUF loader."""
import jax
import numpy as np
import pytest
import torch
import transformers

from o1jax.convert import layout, load_gguf
from o1jax.generate import Generator
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


def test_greedy_generation_matches_transformers(smollm2):
  """32 greedy tokens for the chat prompt, token for token, and for a left-padded batch of two prompts."""
  cfg, params, tokenizer, torch_model = smollm2
  questions = ["What is the capital of France?", "Name three primary colors."]
  prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for q in questions]
  eos = tokenizer.eos_token_id
  ours = Generator(cfg, params, eos_ids=(eos,)).generate(prompts, max_new_tokens=32)
  tokenizer.padding_side = "left"
  batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
  with torch.no_grad():
    out = torch_model.generate(**batch, do_sample=False, max_new_tokens=32, eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id)
  width = batch["input_ids"].shape[1]
  for row, got in enumerate(ours):
    want = out[row, width:].tolist()
    want = want[:want.index(eos) + 1] if eos in want else want
    assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
  assert tokenizer.decode(ours[0], skip_special_tokens=True).startswith("The capital of France is Paris")


def test_repetition_penalty_matches_transformers(smollm2):
  """48 greedy tokens with transformers' repetition penalty, each prompt generated alone there (no padding to
  count) and together here (left-padded): token for token, and not what the unpenalized model writes."""
  cfg, params, tokenizer, torch_model = smollm2
  questions = ["List the planets of the solar system.", "Repeat after me: la la la la la la la la."]
  prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for q in questions]
  eos = tokenizer.eos_token_id
  generator = Generator(cfg, params, eos_ids=(eos,))
  ours = generator.generate(prompts, max_new_tokens=48, repetition_penalty=1.3)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=48, eos_token_id=eos, repetition_penalty=1.3,
                                 pad_token_id=tokenizer.pad_token_id)
    want = out[0, len(prompt):].tolist()
    want = want[:want.index(eos) + 1] if eos in want else want
    assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
  assert ours != generator.generate(prompts, max_new_tokens=48)
