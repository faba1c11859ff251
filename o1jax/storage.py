"""Paths on the local disk or in an object store (`gs://bucket/...`, any fsspec protocol), behind one interface.

Every o1jax reader and writer of run data (shards, manifests, checkpoints' `run/` files, logs) goes through this
module. A path is remote when it has a scheme (`scheme://`): remote paths go through fsspec (gcsfs for `gs://`),
local paths through the standard library, exactly as before (`open`, `os.pread`, `glob`, `os.rename`).

Contract of the remote side:
  * objects are published whole: `put_bytes` is one upload, so a reader sees the old object or the new one;
  * `RangeReader.pread` is one ranged GET of the bytes asked for (never a whole-object download), safe from any
    thread (fsspec runs its requests on one event loop);
  * object stores have no directories: `makedirs` does nothing there, `is_dir` means "some object lies below";
  * `rename` of a remote tree copies, then deletes the source (no atomic rename on object stores), so a crash
    leaves the source intact;
  * `create_new`, `object_generation`, `set_metadata` and `delete_if_generation` are Cloud Storage's
    generation preconditions (gs:// only), the building blocks of `o1jax.lease`.

Settings, from the environment:
  * credentials: gcsfs's and google-auth's defaults (application default credentials, `GOOGLE_APPLICATION_
    CREDENTIALS`, the metadata server); nothing is read or logged here.
  * gcsfs keeps no listings cache (`use_listings_cache` off for gs://, orbax's file system included): other
    processes (a trainer, tensorstore's own writes) change what is in a bucket, and a cached listing would show
    steps that keep-K has since deleted.
  * `EPATH_USE_TF` defaults to false: orbax's path operations (etils.epath) then use fsspec/gcsfs, the client
    and credentials o1jax's own reads use, instead of tf.io.gfile (which also makes every path operation load
    TensorFlow where it is installed).
  * `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (the variable Google's clients honour for a Cloud Storage
    emulator) points every client at the emulator: gcsfs and google-cloud-storage (TensorBoard's gs:// writer)
    read it themselves; o1jax also sets tensorstore's endpoint (`TENSORSTORE_GCS_HTTP_URL`, orbax's array I/O)
    and turns off gcsfs's zonal-bucket probe (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`, a gRPC call an emulator does
    not serve: every first request to a bucket would wait minutes for it to time out). Each is a default: a value
    already in the environment wins.
"""
from __future__ import annotations

import builtins
import glob as globlib
import os
from typing import IO, Any

import fsspec

PathLike = str | os.PathLike


def _settings() -> None:
  """The environment defaults above; applied on import and again before each remote access, so that an
  emulator named after o1jax was imported (but before the first remote access) is honoured too."""
  os.environ.setdefault("EPATH_USE_TF", "false")
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", os.environ["STORAGE_EMULATOR_HOST"])
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is first imported


_settings()


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object-store location (`gs://...`) rather than a local file."""
  return "://" in os.fspath(path)


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """(file system, path without its protocol); fsspec caches one file system per protocol and options."""
  _settings()
  return fsspec.core.url_to_fs(path)


def join(path: PathLike, *parts: str) -> str:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.join(path, *parts)
  return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(path: PathLike) -> str:
  path = os.fspath(path)
  return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def name(path: PathLike) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def exists(path: PathLike) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(path)
  fs, key = _fs(path)
  return fs.exists(key)


def is_file(path: PathLike) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isfile(path)
  fs, key = _fs(path)
  return fs.isfile(key)


def is_dir(path: PathLike) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isdir(path)
  fs, key = _fs(path)
  return fs.isdir(key)


def has_magic(pattern: PathLike) -> bool:
  return globlib.has_magic(os.fspath(pattern))


def glob(pattern: PathLike) -> list[str]:
  """The paths matching `pattern` (`*`, `?`, `[...]`), sorted; remote ones keep their scheme."""
  pattern = os.fspath(pattern)
  if not is_remote(pattern):
    return sorted(globlib.glob(pattern))
  fs, key = _fs(pattern)
  return sorted(fs.unstrip_protocol(p) for p in fs.glob(key))


def listdir(path: PathLike) -> list[str]:
  """Names of the entries directly under directory `path`, sorted."""
  path = os.fspath(path)
  if not is_remote(path):
    return sorted(os.listdir(path))
  fs, key = _fs(path)
  return sorted(name(p) for p in fs.ls(key, detail=False) if p.rstrip("/") != key.rstrip("/"))


def walk_files(root: PathLike) -> list[tuple[str, int, str]]:
  """(path relative to `root`, size, version) of every file under `root`, sorted by path components; the version
  changes whenever the file is rewritten (mtime in ns locally, the object generation remotely)."""
  root = os.fspath(root)
  if not is_remote(root):
    out = []
    for directory, _, files in os.walk(root):
      for f in files:
        stat = os.stat(os.path.join(directory, f))
        out.append((os.path.relpath(os.path.join(directory, f), root), stat.st_size, str(stat.st_mtime_ns)))
    return sorted(out, key=lambda file: file[0].split(os.sep))
  fs, key = _fs(root)
  prefix = key.rstrip("/") + "/"
  return sorted(((p[len(prefix):], int(info["size"]), str(info.get("generation", info.get("mtime", ""))))
                 for p, info in fs.find(key, detail=True).items()), key=lambda file: file[0].split("/"))


def size(path: PathLike) -> int:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.getsize(path)
  fs, key = _fs(path)
  return fs.size(key)


def open(path: PathLike, mode: str = "rb", **kwargs: Any) -> IO:  # pylint: disable=redefined-builtin
  """A file object. Remote writes publish the object when the file is closed (and not at all on an error)."""
  path = os.fspath(path)
  if not is_remote(path):
    return builtins.open(path, mode, **kwargs)
  return fsspec.open(path, mode, **kwargs).open()


def read_bytes(path: PathLike) -> bytes:
  path = os.fspath(path)
  if not is_remote(path):
    with builtins.open(path, "rb") as f:
      return f.read()
  fs, key = _fs(path)
  return fs.cat_file(key)


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def put_bytes(path: PathLike, data: bytes) -> None:
  """Uploads `data` as the whole object `path` (remote only: local writes go through `o1jax.files`)."""
  fs, key = _fs(os.fspath(path))
  fs.pipe_file(key, data)


def put_file(local: PathLike, path: PathLike) -> None:
  """Uploads local file `local` as the whole object `path` (streamed, resumable for large files)."""
  fs, key = _fs(os.fspath(path))
  fs.put_file(os.fspath(local), key)


def makedirs(path: PathLike) -> None:
  """Creates local directory `path` and its parents; nothing for a remote one (object stores have no
  directories: an object's name is its whole path)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves a file or directory tree. Local: `os.rename` (atomic). Remote: copies every object, then deletes the
  sources; an interruption leaves the source complete."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src):
    os.rename(src, dst)
    return
  fs, key = _fs(src)
  fs.mv(key, _fs(dst)[1], recursive=True)


def remove(path: PathLike) -> None:
  """Deletes file `path`; a missing file is no error."""
  path = os.fspath(path)
  if not is_remote(path):
    try:
      os.unlink(path)
    except FileNotFoundError:
      pass
    return
  fs, key = _fs(path)
  try:
    fs.rm_file(key)
  except FileNotFoundError:
    pass


class RangeReader:
  """Byte ranges of one file, read from any thread: `os.pread` locally, one ranged GET per read remotely. The
  size is that of the file when opened, so a remote read never asks past its end."""

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)
    self.remote = is_remote(self.path)
    self._fd = None
    if self.remote:
      self._fs, self._key = _fs(self.path)
      self.size = self._fs.size(self._key)
    else:
      self._fd = os.open(self.path, os.O_RDONLY)
      self.size = os.fstat(self._fd).st_size

  def pread(self, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset` (fewer at the end of the file), like `os.pread`."""
    if not self.remote:
      return os.pread(self._fd, n, offset)
    end = min(offset + n, self.size)
    return self._fs.cat_file(self._key, start=offset, end=end) if end > offset else b""

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class ReadAhead:
  """`pread` through one buffer of `block` bytes, for a sequential pass over many small ranges (a remote file's
  framing headers): one request per block instead of one per range. Not thread-safe."""

  def __init__(self, reader: RangeReader, block: int):
    self._reader, self._block = reader, block
    self._start, self._buffer = 0, b""

  def pread(self, n: int, offset: int) -> bytes:
    if n > self._block:
      return self._reader.pread(n, offset)
    if not self._start <= offset or offset + n > self._start + len(self._buffer):
      self._start, self._buffer = offset, self._reader.pread(self._block, offset)
    return self._buffer[offset - self._start:offset - self._start + n]


# Cloud Storage generation preconditions (gs:// only): an object's generation changes whenever it is replaced.

def _gcs(path: PathLike) -> tuple[Any, str, str]:
  path = os.fspath(path)
  if not path.startswith("gs://"):
    raise ValueError(f"{path}: generation preconditions need a gs:// path")
  fs, key = _fs(path)
  bucket, _, obj = key.partition("/")
  return fs, bucket, obj


def create_new(path: PathLike, data: bytes, metadata: dict[str, str] | None = None) -> bool:
  """Uploads `data` (with custom `metadata`) as object `path` only if no such object exists
  (ifGenerationMatch=0); whether it did."""
  fs, bucket, obj = _gcs(path)
  try:
    fs.pipe_file(f"{bucket}/{obj}", data, mode="create", metadata=metadata)
  except FileExistsError:  # HTTP 412: the precondition failed
    return False
  return True


def object_generation(path: PathLike) -> tuple[str, dict[str, str]] | None:
  """(generation, custom metadata) of object `path`, or None if there is none."""
  fs, bucket, obj = _gcs(path)
  try:
    info = fs.call("GET", "b/{}/o/{}", bucket, obj, json_out=True)
  except FileNotFoundError:
    return None
  return str(info["generation"]), dict(info.get("metadata") or {})


def set_metadata(path: PathLike, metadata: dict[str, str], generation: str) -> bool:
  """Sets custom metadata of object `path` if it is still `generation` (the object's bytes and generation stay);
  whether it was."""
  fs, bucket, obj = _gcs(path)
  try:
    fs.call("PATCH", "b/{}/o/{}", bucket, obj, ifGenerationMatch=generation, json={"metadata": metadata})
  except (FileExistsError, FileNotFoundError):  # 412: replaced since; 404: deleted since
    return False
  return True


def delete_if_generation(path: PathLike, generation: str) -> bool:
  """Deletes object `path` if it is still `generation`; whether it did."""
  fs, bucket, obj = _gcs(path)
  try:
    fs.call("DELETE", "b/{}/o/{}", bucket, obj, ifGenerationMatch=generation)
  except (FileExistsError, FileNotFoundError):
    return False
  return True
