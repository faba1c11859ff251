"""Qwen2.5-7B (the backbone of the reference's released script), pod recipe: variants ':lora' and ':full'."""
from o1jax import config as o1config

ARCH = dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
            max_position_embeddings=32768, attention_bias=True, bos_token_id=151643, eos_token_id=151643)


def get_config(arg=None):
  return o1config.pod_recipe(ARCH, arg)
