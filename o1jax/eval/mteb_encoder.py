"""An o1jax retriever as an `mteb` (2.x) encoder: `mteb.evaluate(O1jaxEncoder.from_pretrained(path), tasks)`.

  encoder = O1jaxEncoder.from_pretrained("runs/scifact/train", think=3, seed=0)   # or think=0: no thinking
  results = mteb.evaluate(encoder, mteb.get_tasks(tasks=["SciFact"]), cache=None)

mteb hands `encode` a DataLoader of batches ({"text": [...]}) and a `prompt_type`: queries (`PromptType.query`) are
embedded as `Retriever.encode_queries` embeds them, with `think` sampled thoughts each (seeded: the same queries
in the same order with the same seed get the same thoughts) or none; documents (and inputs without a prompt type,
as in symmetric tasks) as `Retriever.encode_docs` embeds them, with the document template and the on-disk
embedding cache. Every call's texts are embedded in one `Retriever` call, so mteb's batch size changes nothing.
Vectors are unit length and scored by dot product, the inner product o1jax searches with. mteb is imported only
here: the rest of o1jax runs without it.
"""
from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import os
import pathlib
from typing import Any

import jax
import numpy as np
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from o1jax.generate import Sampling
from o1jax.retrieval.retriever import EVAL_LENGTHS, Retriever


def model_meta(retriever: Retriever, name: str, revision: str | None, experiment: dict[str, Any]) -> ModelMeta:
  """mteb's description of the model; `experiment` (thinking and lengths) keeps results of different settings apart
  in mteb's result cache, as a model's name and revision alone would not."""
  n_parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(retriever.embedder.params))
  return ModelMeta(
      loader=None, name=name, revision=revision, release_date=None, languages=None, n_parameters=n_parameters,
      memory_usage_mb=None, max_tokens=retriever.lengths.doc, embed_dim=retriever.cfg.hidden_size, license=None,
      open_weights=True, public_training_code=None, public_training_data=None, framework=["JAX", "safetensors"],
      similarity_fn_name="dot", use_instructions=False, training_datasets=None, experiment_kwargs=experiment)


class O1jaxEncoder(AbsEncoder):
  """An mteb encoder over an o1jax `Retriever`: queries with `think` thoughts (0 = none), documents as o1jax
  indexes them."""

  def __init__(self, retriever: Retriever, *, think: int = 0, sampling: Sampling = Sampling(), seed: int = 0,
               cache_dir: str | os.PathLike | None = None, name: str = "o1jax/retriever", revision: str | None = None):
    if think < 0:
      raise ValueError(f"think={think}: must be >= 0 thoughts per query (0 = no thinking)")
    # jax keys hold 32 bits: a larger or negative seed would silently alias another seed's thoughts.
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed={seed}: must be in [0, 2**32)")
    self.model = retriever
    self.think, self.sampling, self.seed, self.cache_dir = think, sampling, seed, cache_dir
    experiment = {"think": think, "doc_tokens": retriever.lengths.doc, "dtype": retriever.cfg.dtype}
    if think:
      experiment.update(dataclasses.asdict(sampling), seed=seed)
    self.mteb_model_meta = model_meta(retriever, name, revision, experiment)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32", doc_tokens: int = EVAL_LENGTHS.doc,
                      **kwargs) -> O1jaxEncoder:
    """An exported Hugging Face directory or an o1jax checkpoint directory, named `o1jax/<directory name>` with
    the checkpoint's fingerprint (path, files, sizes, times) as its revision; `kwargs` go to the constructor."""
    retriever = Retriever.from_pretrained(path, dtype=dtype, lengths=dataclasses.replace(EVAL_LENGTHS, doc=doc_tokens))
    kwargs.setdefault("name", f"o1jax/{pathlib.Path(path).resolve().name}")
    kwargs.setdefault("revision", retriever.fingerprint)
    return cls(retriever, **kwargs)

  def encode(self, inputs: Iterable[dict[str, Any]], *, task_metadata: Any = None, hf_split: str | None = None,
             hf_subset: str | None = None, prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
    """Unit float32 vectors [N, D] of every text in `inputs`, in order."""
    texts = [text for batch in inputs for text in batch["text"]]
    if prompt_type == PromptType.query:
      return self.model.encode_queries(texts, self.think, self.sampling, self.seed)
    return self.model.encode_docs(texts, self.cache_dir)
