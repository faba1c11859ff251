"""`python -m o1jax.export --checkpoint=DIR --out=HF_DIR [--step=N]`: a trained retriever as a Hugging Face model.

The checkpoint directory written by `python -m o1jax.train` is enough on its own: its `run/` files give the
config, architecture and tokenizer, and only params (+ LoRA adapters) are restored, as host arrays, whatever mesh
or number of processes saved them. LoRA adapters are merged into the kernels, so the export is a plain
`*ForCausalLM` that `transformers.AutoModelForCausalLM` loads, with the four special tokens in its tokenizer, a
generation config holding the thinking settings of METHOD §6 and a README.md model card (how to think, how to
embed). The directory appears only once complete (staged under a temporary name, then renamed).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import jax
import numpy as np
import transformers

from o1jax import checkpoint, lora, model_card
from o1jax.convert import save_hf
from o1jax.generate import Sampling
from o1jax.model import ModelConfig, init_params
from o1jax.tokenizer import SpecialIds

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Thinking(Sampling):
  """How queries think at inference (METHOD §6): k sampled thoughts, each embedded, vectors averaged."""
  num_thoughts: int = 3


def _with_token_ids(cfg: ModelConfig, tokenizer: Any) -> ModelConfig:
  """Fills BOS / EOS / PAD ids the architecture lacks (random-init models) from the tokenizer, so generation
  stops at EOS in o1jax and transformers alike."""
  special = SpecialIds.from_tokenizer(tokenizer)
  return cfg.replace(
      bos_token_id=cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id,
      eos_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else special.eos,
      pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else special.pad)


def load_checkpoint_for_inference(ckpt_dir: str | os.PathLike, step: int | None = None
                                  ) -> tuple[ModelConfig, dict, Any]:
  """(ModelConfig, host params with LoRA merged, tokenizer with the special tokens) of a training checkpoint.

  Args:
    ckpt_dir: a `config.checkpoint.dir` of `python -m o1jax.train`.
    step: the saved step to load; default the latest.
  """
  config, model_cfg, tokenizer = checkpoint.load_run_files(str(ckpt_dir))
  model_cfg = _with_token_ids(model_cfg, tokenizer)
  abstract = {"params": jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))}
  lora_cfg = dict(config.train.lora) if config.train.finetune == "lora" else None
  if lora_cfg is not None:
    abstract["lora"] = jax.eval_shape(lambda: lora.init(abstract["params"], lora_cfg, jax.random.key(0)))
  _, state = checkpoint.restore_on_host(str(ckpt_dir), abstract, step)
  params = state["params"]
  if lora_cfg is not None:
    params = jax.tree.map(np.asarray, lora.merge(params, state["lora"], lora_cfg))
  return model_cfg, params, tokenizer


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
    if out.exists():
      shutil.rmtree(out)
    staged.rename(out)
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="checkpoint directory of python -m o1jax.train")
  parser.add_argument("--out", required=True, help="Hugging Face directory to write (must not exist)")
  parser.add_argument("--step", type=int, default=None, help="saved step to export (default: the latest)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the exported weights")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  args = parser.parse_args(argv)
  out = export(args.checkpoint, args.out, args.step, args.dtype, args.overwrite)
  print(f"wrote {out}")


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"o1jax.export: {e}")
