"""Checkpoint conversion: Hugging Face directories and GGUF files to o1jax parameters, and back to HF."""
from o1jax.convert.gguf import load_gguf
from o1jax.convert.hf import load_hf, save_hf
from o1jax.convert.layout import ConversionError

__all__ = ["ConversionError", "load_gguf", "load_hf", "save_hf"]
