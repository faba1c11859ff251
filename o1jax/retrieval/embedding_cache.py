"""On-disk cache of corpus embeddings, keyed by the encoder, its settings and the exact texts."""
from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from o1jax.files import atomic_write


def default_cache_dir() -> pathlib.Path:
  """$O1JAX_CACHE, else ~/.cache/o1jax (never inside a checkout)."""
  return pathlib.Path(os.environ.get("O1JAX_CACHE") or pathlib.Path.home() / ".cache" / "o1jax") / "embeddings"


def cache_key(settings: Sequence[str], texts: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for part in (*settings, "\x00texts", *texts):
    data = part.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two lists hash alike
  return digest.hexdigest()


def cached_encode(encode: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str], settings: Sequence[str],
                  cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """`encode(texts)`, loaded from `cache_dir` when the same settings and texts were encoded before."""
  path = pathlib.Path(cache_dir or default_cache_dir()) / f"{cache_key(settings, texts)}.npy"
  if path.exists():
    embeddings = np.load(path, allow_pickle=False)
    if embeddings.shape[0] == len(texts):
      return embeddings
  embeddings = np.ascontiguousarray(encode(texts), dtype=np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
    raise ValueError(f"encoder returned shape {embeddings.shape} for {len(texts)} texts")
  atomic_write(path, lambda f: np.save(f, embeddings, allow_pickle=False), mode="wb")
  return embeddings
