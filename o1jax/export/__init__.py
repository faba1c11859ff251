"""A trained retriever as a Hugging Face model (`python -m o1jax.export`).

The checkpoint directory written by `python -m o1jax.train` is loaded on its own (`o1jax.retrieval.loading`).
The export directory holds:

  (root)      LoRA adapters merged into the kernels: a plain `*ForCausalLM` that `transformers.AutoModelForCausalLM`
              loads, with the four special tokens in its tokenizer, a generation config holding the thinking
              settings of METHOD §6, a README.md model card (how to think, how to embed), and the
              sentence-transformers files (`sbert`): `SentenceTransformer(dir)` embeds documents and thought-less
              queries.
  adapter/    LoRA runs: the adapters and the special tokens' rows as a PEFT adapter (`peft_adapter`).
  base/       LoRA runs whose backbone was no Hugging Face directory (random init, GGUF): the run's backbone,
              the base model the adapter applies to. A run from a Hugging Face directory names that directory in
              adapter_config.json instead.

The directory appears only once complete (staged under a temporary name, then renamed). An existing one is
replaced only when asked (`overwrite`), only if it is a model directory, and never when it is, holds or lies inside
the checkpoint exported from.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile

import transformers

from o1jax.convert import save_hf
from o1jax.export import model_card, peft_adapter, sbert
from o1jax.files import publish_directory
from o1jax.generate import Sampling
from o1jax.model import ModelConfig
from o1jax.model.config import DTYPES
from o1jax.retrieval.loading import restore_weights
from o1jax.retrieval.retriever import EVAL_LENGTHS
from o1jax.tokenizer import SpecialIds

ADAPTER_DIR, BASE_DIR = "adapter", "base"


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


def _check_out(ckpt_dir: str | os.PathLike, out: pathlib.Path, overwrite: bool) -> None:
  """Raises unless writing the export to `out` is safe: it does not exist, or it is a model directory to replace
  (`overwrite`); and it neither is, holds nor lies inside the checkpoint (a replaced `out` is deleted)."""
  if "://" not in os.fspath(ckpt_dir):
    ckpt, target = pathlib.Path(ckpt_dir).resolve(), out.resolve()
    if target == ckpt or ckpt.is_relative_to(target) or target.is_relative_to(ckpt):
      where = "is" if target == ckpt else "holds" if ckpt.is_relative_to(target) else "is inside"
      raise ValueError(f"--out={out} {where} the checkpoint directory {ckpt_dir}; write the export elsewhere")
  if not out.exists() and not out.is_symlink():
    return
  if not overwrite:
    raise FileExistsError(f"--out={out} exists (pass --overwrite to replace it)")
  if out.is_symlink() or not (out / "config.json").is_file():
    raise FileExistsError(f"--out={out} exists and is no model directory (no config.json): not replacing it")


def export(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
           dtype: str = "float32", overwrite: bool = False, thinking: Thinking = Thinking()) -> pathlib.Path:
  """Writes the export directory `out_dir` of a training checkpoint; returns its path."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
  # Absolute without resolving links: `.` gets a name, and a link stays a link (_check_out refuses it).
  out = pathlib.Path(os.path.abspath(out_dir))
  _check_out(ckpt_dir, out, overwrite)
  # One restore of one step (the latest may move on while a trainer runs): the merged model and the adapter
  # both come from it.
  weights = restore_weights(ckpt_dir, step)
  config, lora_cfg, tokenizer = weights.config, weights.lora_cfg, weights.tokenizer
  # The backbone a Hugging Face run started from is the adapter's base; any other is exported as base/.
  base_model = config.model.path if config.model.source == "hf" else None
  params, adapters = weights.merged_params(), weights.lora
  base_params = weights.params if lora_cfg is not None and base_model is None else None
  model_cfg = weights.model_cfg.replace(param_dtype=dtype)
  del weights  # the unmerged kernels are held only while base/ needs them
  out.parent.mkdir(parents=True, exist_ok=True)
  # Staged next to `out` (same file system, so the final rename is atomic); removed on any failure.
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export-") as staging:
    staged = save_hf(model_cfg, params, pathlib.Path(staging) / out.name, tokenizer=tokenizer)
    generation_config(model_cfg, thinking).save_pretrained(staged)
    sbert.write(staged, tokenizer, model_cfg.hidden_size, EVAL_LENGTHS)
    adapter = None
    if lora_cfg is not None:
      if base_params is not None:
        save_hf(model_cfg, base_params, staged / BASE_DIR, tokenizer=tokenizer)
      special = SpecialIds.from_tokenizer(tokenizer)
      full_embeddings = bool(config.train.train_embeddings)
      # The merge leaves the embeddings and the LM head as they are: the adapter's token rows come from `params`.
      peft_adapter.save_adapter(
          staged / ADAPTER_DIR, model_cfg, params, adapters, lora_cfg, tokenizer,
          [special.query, special.query_end, special.thought, special.emb], full_embeddings,
          base_model if base_model is not None else str(out / BASE_DIR), dtype)
      adapter = model_card.AdapterFacts(lora_cfg.rank, lora_cfg.alpha, lora_cfg.targets, full_embeddings,
                                        base_model)
    facts = model_card.CardFacts.of(model_cfg, tokenizer, thinking, source=str(ckpt_dir), adapter=adapter)
    (staged / "README.md").write_text(model_card.render(facts, path=out.name))
    publish_directory(staged, out)
  return out
