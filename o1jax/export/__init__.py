"""A trained retriever as a Hugging Face model (`python -m o1jax.export`).

The checkpoint directory written by `python -m o1jax.train` is loaded on its own (`o1jax.retrieval.loading`).
LoRA adapters are merged into the kernels, so the export is a plain `*ForCausalLM` that
`transformers.AutoModelForCausalLM` loads, with the four special tokens in its tokenizer, a generation config
holding the thinking settings of METHOD §6 and a README.md model card (how to think, how to embed). The directory
appears only once complete (staged under a temporary name, then renamed).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile

import transformers

from o1jax.convert import save_hf
from o1jax.export import model_card
from o1jax.files import publish_directory
from o1jax.generate import Sampling
from o1jax.model import ModelConfig
from o1jax.model.config import DTYPES
from o1jax.retrieval.loading import load_checkpoint_for_inference


@dataclasses.dataclass(frozen=True)
class Thinking(Sampling):
  """How queries think at inference (METHOD §6): k sampled thoughts, each embedded, vectors averaged."""
  num_thoughts: int = 3


def generation_config(cfg: ModelConfig, thinking: Thinking) -> transformers.GenerationConfig:
  """Sampling settings of a thought; `num_return_sequences` stays 1 so that greedy calls keep working (the card
  says to pass num_return_sequences=k)."""
  return transformers.GenerationConfig(
      bos_token_id=cfg.bos_token_id,
      eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_id,
      pad_token_id=cfg.pad_token_id, do_sample=True, temperature=thinking.temperature, top_p=thinking.top_p,
      max_new_tokens=thinking.max_new_tokens)


def export(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
           dtype: str = "float32", overwrite: bool = False, thinking: Thinking = Thinking()) -> pathlib.Path:
  """Writes the Hugging Face directory `out_dir` of a training checkpoint; returns its path."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
  out = pathlib.Path(out_dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
  model_cfg, params, tokenizer = load_checkpoint_for_inference(ckpt_dir, step)
  model_cfg = model_cfg.replace(param_dtype=dtype)
  # Staged next to `out` (same file system, so the final rename is atomic); removed on any failure.
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export-") as staging:
    staged = save_hf(model_cfg, params, pathlib.Path(staging) / out.name, tokenizer=tokenizer)
    generation_config(model_cfg, thinking).save_pretrained(staged)
    facts = model_card.CardFacts.of(model_cfg, tokenizer, thinking, source=str(ckpt_dir))
    (staged / "README.md").write_text(model_card.render(facts, path=out.name))
    publish_directory(staged, out)
  return out
