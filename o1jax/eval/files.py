"""Atomic file writes: a reader never sees a half-written run, metrics or embedding file."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "w") -> None:
  """Calls `write(f)` on a temporary file next to `path`, then renames it over `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))
