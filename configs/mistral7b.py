"""Mistral-7B (v0.1 architecture), the pod recipe of METHOD §4: variants ':lora' (default) and ':full'.

  python -m o1jax.train --config=configs/mistral7b.py:lora --config.model.path=/ckpt/Mistral-7B-v0.1 \\
      --config.data.train_files="('/data/o1/train-*.tfrecord',)"
"""
from o1jax import config as o1config

ARCH = dict(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=32768, sliding_window=4096, bos_token_id=1, eos_token_id=2)


def get_config(arg=None):
  return o1config.pod_recipe(ARCH, arg)
