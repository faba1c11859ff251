"""Logits parity of o1jax (imported with load_hf) against transformers' PyTorch models, per family and setting.

Every model is a tiny random transformers model saved with `save_pretrained`; all its parameters (biases and norm
weights included, which transformers initialises to constants) are perturbed so no mapping error can hide.
"""
import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from o1jax.convert import load_hf
from o1jax.model import Decoder

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama_rope_llama3_untied": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE,
                                                                 tie_word_embeddings=False)),
    "llama_attention_bias_tied": (transformers.LlamaConfig, dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral_sliding_window_untied": (transformers.MistralConfig, dict(sliding_window=4,
                                                                       tie_word_embeddings=False)),
    "qwen2_qkv_bias_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
}
SEQ = 12
PADS = (0, 3, 7)  # pad tokens per row: none, some, most of the row


def save_tiny(path, config_cls, seed: int = 0, max_shard_size: str | None = None, **overrides):
  """A random tiny transformers model with every parameter perturbed, saved to `path`; returns the model."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**TINY, **overrides})).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
  return model


def padded_batch(side: str, vocab: int, seed: int = 0):
  """Random ids with a left- or right-padded mask and transformers-style positions (cumsum - 1, clipped at 0)."""
  ids = np.random.RandomState(seed).randint(0, vocab, (len(PADS), SEQ))
  mask = np.ones_like(ids)
  for row, pad in enumerate(PADS):
    if side == "left":
      mask[row, :pad] = 0
    else:
      mask[row, SEQ - pad:] = 0
  positions = np.clip(mask.cumsum(-1) - 1, 0, None)
  return ids, mask, positions


def torch_logits(model, ids, mask, positions) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


def _logits(model, params, ids, positions, mask):
  hidden = model.apply({"params": params}, ids, positions, mask)
  return model.apply({"params": params}, hidden, method=Decoder.logits)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  config_cls, overrides = CASES[request.param]
  path = tmp_path_factory.mktemp(request.param)
  torch_model = save_tiny(path, config_cls, **overrides)
  cfg, params = load_hf(path)
  return request.param, torch_model, cfg, params, jax.jit(functools.partial(_logits, Decoder(cfg)))


def test_config_is_read(case):
  name, torch_model, cfg, params, _ = case
  hf = torch_model.config
  assert cfg.family == hf.model_type
  assert cfg.tie_word_embeddings == hf.tie_word_embeddings == ("lm_head" not in params)
  assert cfg.sliding_window == (4 if name.startswith("mistral") else None)
  assert cfg.attention_bias == ("bias" in name)
  assert (cfg.rope_scaling or {}).get("rope_type", "default") == ("llama3" if "llama3" in name else "default")


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers(case, side):
  name, torch_model, cfg, params, logits_fn = case
  ids, mask, positions = padded_batch(side, cfg.vocab_size)
  assert mask.sum(-1).tolist() == [SEQ - p for p in PADS]
  want = torch_logits(torch_model, ids, mask, positions)
  got = np.asarray(logits_fn(params, ids, positions, mask))
  real = mask.astype(bool)
  diff = np.abs(got - want)[real].max()
  assert diff <= 1e-4, f"{name} {side}-padded: max |o1jax - transformers| = {diff:.3g}"
