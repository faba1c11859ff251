"""Atomic writes: a reader never sees a half-written file or directory under its final name.

Local files are written to a temporary name beside the target, fsynced, then renamed over it. Paths with a
scheme (`gs://...`, through `o1jax.storage`) are written in one object upload, which object stores publish whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import stat
from typing import Any, Callable, IO

from o1jax import storage


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "w") -> None:
  """Calls `write(f)` on a temporary file next to local `path`, then renames it over `path`.

  A new file gets the mode a plain `open` would give it (0666 less the umask), an existing one keeps its mode:
  `tempfile.mkstemp` would make every file private (0600)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  f = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666),  # the kernel applies the umask
                mode, **({} if "b" in mode else {"encoding": "utf-8"}))
  try:
    with f:
      with contextlib.suppress(FileNotFoundError):
        os.chmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """`data` as the whole content of `path`, local or remote (`gs://`)."""
  if storage.is_remote(path):
    storage.put_bytes(path, data)
  else:
    atomic_write(path, lambda f: f.write(data), mode="wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
  """Indented, key-sorted JSON with a final newline (stable diffs of committed results)."""
  atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")


def publish_directory(staged: pathlib.Path, out: pathlib.Path) -> None:
  """Renames the complete directory `staged` to `out` (same file system). An existing `out` is moved aside
  first and deleted only once the new one is in place, so a failure leaves one of the two intact."""
  if not out.exists():
    staged.rename(out)
    return
  old = out.parent / f".{out.name}.old-{os.getpid()}"
  out.rename(old)
  staged.rename(out)
  shutil.rmtree(old)
