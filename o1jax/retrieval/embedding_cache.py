"""On-disk cache of corpus embeddings, keyed by the encoder, its settings and the exact texts.

`<key>.npy` holds the vectors (a plain float32 .npy file) and `<key>.json` its key and the SHA-256 of the .npy
bytes. A file that fails any check (missing checksum, other key, changed, truncated or unreadable bytes, wrong
shape or dtype) is never used: a warning names the file and the problem and the embeddings are computed again.
The cache only saves time, so failing to write it is a warning too, never lost work.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from o1jax.files import atomic_write, atomic_write_json


class _Invalid(Exception):
  """A cache entry that must not be used; the message says why."""


def default_cache_dir() -> pathlib.Path:
  """$O1JAX_CACHE, else ~/.cache/o1jax (never inside a checkout)."""
  return pathlib.Path(os.environ.get("O1JAX_CACHE") or pathlib.Path.home() / ".cache" / "o1jax") / "embeddings"


def cache_key(settings: Sequence[str], texts: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for part in (*settings, "\x00texts", *texts):
    data = part.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two lists hash alike
  return digest.hexdigest()


def _load(path: pathlib.Path, checksum_path: pathlib.Path, key: str, rows: int) -> np.ndarray:
  """The verified vectors of a cache entry; raises _Invalid (or OSError) naming the problem."""
  try:
    meta = json.loads(checksum_path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise _Invalid(f"no checksum file {checksum_path.name} (written by an older o1jax, or interrupted)") from None
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise _Invalid(f"unreadable checksum file {checksum_path.name}") from None
  if not isinstance(meta, dict) or meta.get("key") != key:
    raise _Invalid(f"{checksum_path.name} belongs to another encoder or corpus")
  # One read for the digest and the parse, so the bytes checked are the bytes used.
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
    raise _Invalid("checksum mismatch: the file was changed, truncated or replaced")
  try:
    embeddings = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, EOFError) as e:
    raise _Invalid(f"not a readable .npy file ({e})") from None
  if embeddings.dtype != np.float32 or embeddings.ndim != 2 or embeddings.shape[0] != rows:
    raise _Invalid(f"holds {embeddings.dtype} {embeddings.shape}, expected float32 ({rows}, dim)")
  return embeddings


def _store(path: pathlib.Path, checksum_path: pathlib.Path, key: str, embeddings: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, embeddings, allow_pickle=False)
  data = buffer.getvalue()
  # The vectors first: a crash between the two writes leaves vectors without a matching checksum, which reads
  # as invalid, never the other way round.
  atomic_write(path, lambda f: f.write(data), mode="wb")
  atomic_write_json(checksum_path, {"key": key, "sha256": hashlib.sha256(data).hexdigest()})


def cached_encode(encode: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str], settings: Sequence[str],
                  cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """`encode(texts)`, loaded from `cache_dir` when the same settings and texts were encoded before."""
  key = cache_key(settings, texts)
  path = pathlib.Path(cache_dir or default_cache_dir()) / f"{key}.npy"
  checksum_path = path.with_suffix(".json")
  if path.exists():
    try:
      return _load(path, checksum_path, key, len(texts))
    except (_Invalid, OSError) as e:
      logging.warning("embedding cache %s is not used: %s; computing the embeddings again", path, e)
  embeddings = np.ascontiguousarray(encode(texts), dtype=np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
    raise ValueError(f"encoder returned shape {embeddings.shape} for {len(texts)} texts")
  try:
    _store(path, checksum_path, key, embeddings)
  except OSError as e:
    logging.warning("embedding cache %s could not be written (%s); the embeddings are used uncached", path, e)
  return embeddings
