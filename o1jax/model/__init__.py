"""The o1jax decoder (Llama / Mistral / Qwen2 families) and its configuration."""
from o1jax.model.config import ModelConfig
from o1jax.model.decoder import REMAT_POLICIES, Decoder, KVCache, init_params, logical_axes, decoding_layout
from o1jax.model.pooling import pool_last, positions

__all__ = ["REMAT_POLICIES", "Decoder", "KVCache", "ModelConfig", "init_params", "logical_axes", "pool_last",
           "positions", "decoding_layout"]
