"""Indexed, streaming source of training records from committee-refined TFRecord shards.

`open_source(entries)` takes glob patterns, file paths and/or `manifest.json` files written by
`python -m data_tools.synthesize`, and returns a `TFRecordSource`: a sequence whose `len()` and `records[i]`
are what `o1jax.data.batching.Batcher` needs. Opening scans only the framing headers of every shard (length +
its CRC, no payload read) into one int64 byte offset per record, so memory is O(records x 8 bytes), not the
data; `records[i]` then reads that one record with `os.pread` (thread-safe, no shared file position), or for a
shard in an object store (`gs://...`, through `o1jax.storage`) with one ranged GET of its bytes, checks its
data CRC and decodes it to the batcher's dict {query_id, query, thought, positives, negatives} plus the teacher
scores {positive_scores, negative_scores} where the shard has them (distillation). Indexing a remote shard reads
it once front to back in `SCAN_BLOCK` ranges (one request per block, not one per record header; memory one
block), since a header's position is known only from the one before it.

Processes and determinism. `Batcher` defines the global batch `i` from one permutation of *all* records and
gives each process its own contiguous rows. Every process therefore indexes every shard (16 bytes read per
record) and reads payloads only for its own rows, so the global batches, the data position saved with
checkpoints and every loss are the same whatever the number of hosts. A manifest's SHA-256 checks (a full read)
are the work that is split: shard s is verified by process `s % jax.process_count()`; any mismatch fails the
job. Per-process shard ownership of the records themselves was rejected: it would make the batches depend on
the host count and the shard sizes.

Bad input raises `tfrecord.TFRecordError` naming file, record index and byte offset: a corrupt framing header
when the files are opened, a corrupt payload only when a batch reads it. With `skip_bad=True` the index scan
also checks every data CRC and reports corrupt records in `source.skipped`; they keep their index (reading one
still raises, and `Batcher` with `skip_bad` puts the next usable record in its place), so the record count, the
permutation and the data position saved with a checkpoint are those of the intact data, and a run stopped by a
corrupt record resumes at the same example. A corrupt header or a truncated tail ends that file's index (no later
boundary can be trusted), which does change the count.

Plain file patterns have no manifest to check them against: `open_source` refuses a pattern that matches a
numbered shard set (`name-00001-of-00008.tfrecord`) with a shard missing (files named one by one may be any part
of a set), and warns of an empty file outside a manifest: either would silently train on fewer records.
"""
from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any
import weakref

from google.protobuf import message as pb_message
import numpy as np
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

from o1jax import storage
from o1jax.data import tfrecord

_TEXT_FIELDS = ("query_id", "query", "thought", "positives", "negatives")
_REQUIRED = ("query_id", "query", "positives")
_SCORE_FIELDS = ("positive_scores", "negative_scores")
_SHARD_FIELDS = ("shard", "file", "num_records", "sha256")  # of each manifest entry
SCAN_BLOCK = 8 << 20  # bytes per request when indexing a remote shard


class ManifestError(ValueError):
  """A manifest that does not describe the files next to it; names the manifest, the shard and the field."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Under skip_bad: a corrupt record (kept in the index, replaced by `Batcher`), or for a corrupt header or a
  truncated tail the rest of a file, left out of the index."""
  path: str
  index: int
  offset: int
  problem: str

  def __str__(self) -> str:
    return f"{self.path}: record {self.index} at byte offset {self.offset}: {self.problem}"


def _scan(path: str, reader: storage.RangeReader, skip_bad: bool, skipped: list[Skipped]) -> np.ndarray:
  """Byte offsets of the records of one file, from its framing headers (and data CRCs under skip_bad)."""
  size = reader.size
  if reader.remote:
    reader = storage.ReadAhead(reader, SCAN_BLOCK)
  offsets = array.array("q")
  offset, index = 0, 0
  while offset < size:
    header = reader.pread(tfrecord.HEADER.size, offset)
    problem = None
    if len(header) < tfrecord.HEADER.size:
      problem = f"truncated header ({len(header)} of {tfrecord.HEADER.size} bytes)"
    else:
      length, length_crc = tfrecord.HEADER.unpack(header)
      end = offset + tfrecord.HEADER.size + length + tfrecord.FOOTER.size
      if tfrecord.masked_crc32c(header[:8]) != length_crc:
        problem = "length CRC mismatch (corrupt header)"
      elif end > size:
        problem = f"truncated record (expected {length} data bytes plus a 4-byte CRC, file ends at {size})"
    if problem is not None:
      if not skip_bad:
        raise tfrecord.TFRecordError(path, index, offset, problem)
      skipped.append(Skipped(path, index, offset, problem + "; rest of the file skipped"))
      break
    if skip_bad and not _data_crc_ok(reader, offset, length):
      skipped.append(Skipped(path, index, offset, "data CRC mismatch (corrupt record)"))
    offsets.append(offset)
    offset, index = end, index + 1
  return np.frombuffer(offsets, np.int64) if offsets else np.zeros(0, np.int64)


def _data_crc_ok(reader: storage.RangeReader | storage.ReadAhead, offset: int, length: int) -> bool:
  body = reader.pread(length + tfrecord.FOOTER.size, offset + tfrecord.HEADER.size)
  return tfrecord.masked_crc32c(body[:length]) == tfrecord.FOOTER.unpack(body[length:])[0]


def _close_all(readers: list[storage.RangeReader]) -> None:
  # Emptied, so a closed source cannot read a descriptor number the OS has since given to another file.
  while readers:
    readers.pop().close()


class TFRecordSource(Sequence):
  """Random access to the training records of TFRecord files, in file order then record order."""

  def __init__(self, files: Sequence[str | os.PathLike], skip_bad: bool = False):
    if not files:
      raise FileNotFoundError("no TFRecord files given")
    self.files = [os.fspath(f) for f in files]
    self.skipped: list[Skipped] = []
    self._readers: list[storage.RangeReader] = []
    # Closes the files when the source is garbage collected, even if close() is never called.
    self._finalizer = weakref.finalize(self, _close_all, self._readers)
    self._offsets = []
    for path in self.files:
      self._readers.append(storage.RangeReader(path))
      self._offsets.append(_scan(path, self._readers[-1], skip_bad, self.skipped))
    self._starts = np.cumsum([0] + [len(o) for o in self._offsets])

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def index_nbytes(self) -> int:
    """Host memory of the index: one int64 offset per record."""
    return sum(o.nbytes for o in self._offsets)

  def counts(self) -> list[int]:
    """Records indexed per file."""
    return [len(o) for o in self._offsets]

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range: {len(self)} records")
    i %= len(self)
    shard = int(np.searchsorted(self._starts, i, side="right")) - 1
    local = i - int(self._starts[shard])
    return self._read(shard, local, int(self._offsets[shard][local]))

  def _read(self, shard: int, index: int, offset: int) -> dict[str, Any]:
    if not self._readers:
      raise ValueError(f"reading record {index} of {self.files[shard]} from a closed TFRecordSource")
    path, reader = self.files[shard], self._readers[shard]
    header = reader.pread(tfrecord.HEADER.size, offset)
    length, length_crc = tfrecord.HEADER.unpack(header)
    if tfrecord.masked_crc32c(header[:8]) != length_crc:  # the file changed since it was indexed
      raise tfrecord.TFRecordError(path, index, offset, "length CRC mismatch (corrupt header)")
    body = reader.pread(length + tfrecord.FOOTER.size, offset + tfrecord.HEADER.size)
    if len(body) < length + tfrecord.FOOTER.size:
      raise tfrecord.TFRecordError(path, index, offset, "truncated record (the file shrank since it was indexed)")
    data = body[:length]
    if tfrecord.masked_crc32c(data) != tfrecord.FOOTER.unpack(body[length:])[0]:
      raise tfrecord.TFRecordError(path, index, offset, "data CRC mismatch (corrupt record)")
    # Only the text features training needs are converted (3x faster than decoding the whole Example).
    try:
      feature = example_pb2.Example.FromString(data).features.feature
    except pb_message.DecodeError as e:
      raise tfrecord.TFRecordError(path, index, offset, f"not a tf.train.Example ({e})") from e
    record = {}
    for key in _TEXT_FIELDS:
      kind = feature[key].WhichOneof("kind") if key in feature else None
      if kind not in (None, "bytes_list"):
        raise tfrecord.TFRecordError(path, index, offset, f"feature {key!r} is a {kind}, expected a bytes_list")
      try:
        values = [v.decode("utf-8") for v in feature[key].bytes_list.value] if kind else []
      except UnicodeDecodeError as e:
        raise tfrecord.TFRecordError(path, index, offset, f"feature {key!r} is not UTF-8 ({e})") from e
      if not values and key in _REQUIRED:
        raise tfrecord.TFRecordError(path, index, offset, f"missing feature {key!r}")
      record[key] = values if key in ("positives", "negatives") else (values or [""])[0]
    for key in _SCORE_FIELDS:
      kind = feature[key].WhichOneof("kind") if key in feature else None
      if kind not in (None, "float_list"):
        raise tfrecord.TFRecordError(path, index, offset, f"feature {key!r} is a {kind}, expected a float_list")
      if kind:
        record[key] = np.asarray(feature[key].float_list.value, np.float32)
    return record

  def close(self) -> None:
    self._finalizer()

  def __enter__(self) -> TFRecordSource:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _manifest_shards(manifest: str) -> list[dict[str, Any]]:
  """The shard entries of a synthesize manifest, checked for a complete, consistent shard set."""
  try:
    content = json.loads(storage.read_text(manifest))
  except (OSError, ValueError) as e:
    raise ManifestError(f"{manifest}: cannot read the manifest ({e})") from e
  if not isinstance(content, dict) or not isinstance(content.get("shards"), list) or \
      not isinstance(content.get("num_shards"), int):
    raise ManifestError(f"{manifest}: expected an object with 'num_shards' (int) and 'shards' (list)")
  shards = content["shards"]
  for n, s in enumerate(shards):
    missing = [k for k in _SHARD_FIELDS if not isinstance(s, dict) or k not in s]
    if missing:
      raise ManifestError(f"{manifest}: shards[{n}]: missing field(s) {missing}")
  numbers = sorted(s["shard"] for s in shards)
  if numbers != list(range(content["num_shards"])):
    raise ManifestError(f"{manifest}: num_shards={content['num_shards']} but the listed shards are {numbers}")
  if content.get("num_records") is not None and content["num_records"] != sum(s["num_records"] for s in shards):
    raise ManifestError(f"{manifest}: num_records={content['num_records']} is not the sum of the shard counts")
  return sorted(shards, key=lambda s: s["shard"])


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _shard_file(manifest: str, shard: dict[str, Any]) -> str:
  return storage.join(storage.parent(manifest), shard["file"])


def _check_manifest_files(manifest: str, shards: list[dict[str, Any]], process_index: int,
                          process_count: int) -> list[str]:
  """Paths of the shards; raises ManifestError for a missing shard or (on its verifying process) a bad SHA-256."""
  paths = []
  for s in shards:
    path = _shard_file(manifest, s)
    if not storage.is_file(path):
      raise ManifestError(f"{manifest}: shard {s['shard']}: file {path} is missing")
    if s["shard"] % process_count == process_index:
      digest = _sha256(path)
      if digest != s["sha256"]:
        raise ManifestError(f"{manifest}: shard {s['shard']}: {path} has SHA-256 {digest}, the manifest lists "
                            f"{s['sha256']}")
    paths.append(path)
  return paths


_NUMBERED_SHARD = re.compile(r"(?P<prefix>.*)-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^/]*)?$")


def _missing_shards(matches: list[str]) -> list[str]:
  """Files of numbered shard sets (`x-00001-of-00003.tfrecord`) among `matches` whose other members are absent."""
  sets: dict[tuple[str, str, str], set[int]] = {}
  for path in matches:
    if m := _NUMBERED_SHARD.match(path):
      sets.setdefault((m["prefix"], m["count"], m["suffix"] or ""), set()).add(int(m["index"]))
  missing = []
  for (prefix, count, suffix), present in sets.items():
    width = len(count)
    missing += [f"{prefix}-{i:0{width}d}-of-{count}{suffix}" for i in range(int(count)) if i not in present]
  return missing


def _expand(entry: str) -> list[str]:
  if storage.has_magic(entry):
    matches = storage.glob(entry)
    if not matches:
      raise FileNotFoundError(f"no TFRecord files match {entry!r}")
    missing = _missing_shards(matches)
    if missing:
      raise FileNotFoundError(f"{entry!r}: {len(missing)} shard(s) of the set are missing, e.g. {missing[0]}; "
                              "training on the others would silently leave their records out (to train on part of "
                              "a set, name its files one by one)")
    return matches
  if not storage.is_file(entry):
    raise FileNotFoundError(f"TFRecord file {entry!r} not found")
  return [entry]


def open_source(entries: Iterable[str | os.PathLike], skip_bad: bool = False, process_index: int = 0,
                process_count: int = 1) -> TFRecordSource:
  """The records of every entry in order: a `manifest.json` (its shards in shard order, verified), a glob
  pattern (matches sorted) or a file. A file named twice is read once."""
  files: dict[str, None] = {}
  manifests = []
  for entry in map(os.fspath, entries):
    if entry.endswith(".json"):
      manifest = entry
      shards = _manifest_shards(manifest)
      manifests.append((manifest, shards))
      files.update(dict.fromkeys(_check_manifest_files(manifest, shards, process_index, process_count)))
    else:
      files.update(dict.fromkeys(_expand(entry)))
  source = TFRecordSource(list(files), skip_bad)
  counts = dict(zip(source.files, source.counts()))
  listed = {_shard_file(manifest, s) for manifest, shards in manifests for s in shards}
  for path, count in counts.items():
    if count == 0 and path not in listed:
      logging.warning("%s: empty TFRecord file: it adds no training records (a shard lost in a copy?)", path)
  for manifest, shards in manifests:
    for s in shards:
      indexed = counts[_shard_file(manifest, s)]
      if indexed != s["num_records"]:
        source.close()
        raise ManifestError(f"{manifest}: shard {s['shard']}: {indexed} records in {s['file']}, the manifest "
                            f"lists {s['num_records']}")
  return source
