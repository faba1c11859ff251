"""Evaluation during training: the current parameters as a `Retriever` on a small BEIR dev set.

`config.eval` (every, dataset, split, max_queries, think, max_new_tokens) picks the set and how queries are
embedded; metrics come back as `eval/<measure>` entries for the training logger. The evaluator is given inference
parameters (LoRA adapters already merged by the trainer), so it needs nothing of a train state or of how the
model was fine-tuned. Search is exact (deterministic) and document embeddings are not cached (the weights change
between evaluations). The jitted embedding and generation functions are module-level, so each evaluation after
the first reuses their compiled programs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh
import ml_collections

from o1jax.data.readers import load_beir
from o1jax.eval import retriever_eval
from o1jax.model import ModelConfig
from o1jax.retrieval.retriever import Retriever, Sampling


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Every `every` steps (0 = never): the first `max_queries` (0 = all) queries of `split` of the BEIR directory
  `dataset`, each with `think` thoughts (0 = none) of at most `max_new_tokens` tokens."""
  every: int
  dataset: str
  split: str
  max_queries: int
  think: int
  max_new_tokens: int

  @classmethod
  def from_config(cls, section: ml_collections.ConfigDict) -> EvalSettings:
    """From `config.eval` of the trainer's config."""
    return cls(every=int(section.every), dataset=str(section.dataset), split=str(section.split),
               max_queries=int(section.max_queries), think=int(section.think),
               max_new_tokens=int(section.max_new_tokens))


class DevEvaluator:

  def __init__(self, eval_config: EvalSettings, model_cfg: ModelConfig, tokenizer: Any, mesh: Mesh, seed: int):
    self.dataset = retriever_eval.first_queries(load_beir(eval_config.dataset, eval_config.split),
                                                eval_config.max_queries)
    self.think = eval_config.think
    self.sampling = Sampling(max_new_tokens=eval_config.max_new_tokens)
    self.model_cfg, self.tokenizer, self.mesh, self.seed = model_cfg, tokenizer, mesh, seed

  def __call__(self, params: Any) -> dict[str, float]:
    """`eval/<measure>` of the inference parameters `params`."""
    retriever = Retriever(self.model_cfg, params, self.tokenizer, mesh=self.mesh)
    retriever_eval.index_corpus(retriever, self.dataset, backend="exact")
    evaluation = retriever_eval.evaluate(retriever, self.dataset, self.think, sampling=self.sampling, rng=self.seed)
    return {f"eval/{m}": v for m, v in evaluation.metrics.items()}
