"""Llama-3-8B, the pod recipe of METHOD §4: variants ':lora' (default) and ':full'."""
from o1jax import config as o1config

ARCH = dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
            max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)


def get_config(arg=None):
  return o1config.pod_recipe(ARCH, arg)
