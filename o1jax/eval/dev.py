"""Evaluation during training: the current parameters as a `Retriever` on a small BEIR dev set.

`config.eval` (every, dataset, split, max_queries, think, max_new_tokens) picks the set and how queries are
embedded; metrics come back as `eval/<measure>` entries for the training logger. Search is exact (deterministic)
and document embeddings are not cached (the weights change between evaluations). The jitted embedding and
generation functions are module-level, so each evaluation after the first reuses their compiled programs.
"""
from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from o1jax import lora
from o1jax.data.readers import load_beir
from o1jax.eval import o1
from o1jax.model import ModelConfig
from o1jax.retriever import Retriever, Sampling


class DevEvaluator:

  def __init__(self, eval_config: Any, model_cfg: ModelConfig, tokenizer: Any, mesh: Mesh,
               lora_cfg: dict | None, seed: int):
    self.dataset = o1.first_queries(load_beir(eval_config.dataset, eval_config.split), eval_config.max_queries)
    self.think = int(eval_config.think)
    self.sampling = Sampling(max_new_tokens=int(eval_config.max_new_tokens))
    self.model_cfg, self.tokenizer, self.mesh, self.lora_cfg, self.seed = model_cfg, tokenizer, mesh, lora_cfg, seed

  def __call__(self, state: dict) -> dict[str, float]:
    """`eval/<measure>` of the state's parameters (LoRA adapters merged)."""
    params = state["params"]
    if self.lora_cfg is not None:
      params = lora.merge(params, state["lora"], self.lora_cfg)
    retriever = Retriever(self.model_cfg, params, self.tokenizer, mesh=self.mesh)
    o1.index_corpus(retriever, self.dataset, backend="exact")
    evaluation = o1.evaluate(retriever, self.dataset, self.think, sampling=self.sampling, rng=self.seed)
    return {f"eval/{m}": v for m, v in evaluation.metrics.items()}
