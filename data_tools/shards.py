"""Resumable sharded TFRecord output of the data tools (synthesize, ingest, mine, score).

Item i goes to shard `stable_hash(i.query_id) % num_shards`, whatever the worker count or limit; shard s belongs
to worker `s % num_workers`. A shard is written to `<name>.tmp` and renamed when complete, after its sidecar
`<name>.json` (count, sha256, skipped queries) is in place, so a shard under its final name is always whole and
described. A restarted run skips those shards and redoes the rest: nothing lost, nothing duplicated.
`config.json` pins the settings of an output directory; `manifest.json` (counts, checksums, config) is written
by whichever worker sees the last shard finished. `o1jax.data.pipeline.open_source` reads the manifest.
`out` may be local or in an object store (`gs://bucket/dir`, through `o1jax.storage`): there a shard is uploaded
whole when complete, after its sidecar, so the same holds.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
import json
import os
import sys
from typing import Any, Protocol

import tqdm

from data_tools.inputs import stable_hash
from data_tools.record import ThoughtRecord
from o1jax import storage
from o1jax.data import tfrecord
from o1jax.files import atomic_write_json


class Keyed(Protocol):
  query_id: str


# (items of one batch, {query id: reason} to fill with the items set aside) -> the records to write.
MakeRecords = Callable[[list[Any], dict[str, str]], list[ThoughtRecord]]


def read_json(path: storage.PathLike) -> dict[str, Any]:
  try:
    content = json.loads(storage.read_text(path))
  except ValueError as e:  # bad JSON or bad UTF-8
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(content, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
  return content


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def shard_of(query_id: str, num_shards: int) -> int:
  return stable_hash("shard", query_id) % num_shards


def pin_config(out: storage.PathLike, config: dict[str, Any]) -> None:
  """Writes config.json, or checks an existing one: shards of two configs must never mix."""
  path = storage.join(out, "config.json")
  if storage.exists(path):
    previous = read_json(path)
    changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
    if changed:
      raise ValueError(f"{path}: this output directory was made with other settings {changed} "
                       "(old, new); use a new --out")
  else:
    atomic_write_json(path, config)


def write_shard(path: storage.PathLike, shard: int, items: Sequence[Keyed], make_records: MakeRecords, batch: int,
                progress: tqdm.tqdm) -> dict[str, Any]:
  bad: dict[str, str] = {}
  with tfrecord.TFRecordWriter(path) as writer:
    for start in range(0, len(items), batch):
      chunk = list(items[start:start + batch])
      for record in make_records(chunk, bad):
        writer.write(record.to_example())
      progress.update(len(chunk))
    info = {"shard": shard, "file": storage.name(path), "num_records": writer.num_records, "sha256": writer.sha256,
            "skipped": bad}
    atomic_write_json(os.fspath(path) + ".json", info)  # before the rename: a shard is never undescribed
  return info


def write_manifest(out: storage.PathLike, split: str, num_shards: int,
                   config: dict[str, Any]) -> dict[str, Any] | None:
  """manifest.json once every shard is complete (any worker may write it; the content is the same)."""
  names = [shard_name(split, s, num_shards) for s in range(num_shards)]
  if not all(storage.exists(storage.join(out, n)) for n in names):
    return None
  shards = [read_json(storage.join(out, n + ".json")) for n in names]
  manifest = {"config": config, "num_shards": num_shards, "shards": shards,
              "num_records": sum(s["num_records"] for s in shards),
              "num_skipped": sum(len(s["skipped"]) for s in shards)}
  atomic_write_json(storage.join(out, "manifest.json"), manifest)
  return manifest


def run_command(prog: str, main: Callable[[Sequence[str]], Any], argv: Sequence[str],
                errors: tuple[type[Exception], ...] = (ValueError, OSError)) -> None:
  """The command line of a shard-writing tool: `errors` (bad input; an unavailable expert) end it with one line
  naming the tool and exit status 1."""
  try:
    main(argv)
  except errors as e:
    sys.exit(f"{prog}: {' '.join(str(e).splitlines())}")


def write_shards(out: storage.PathLike, split: str, num_shards: int, num_workers: int, worker_index: int,
                 items: Sequence[Keyed], make_records: Callable[[], MakeRecords], config: dict[str, Any],
                 batch: int, desc: str, retry_errors: tuple[type[Exception], ...] = (),
                 retry_hint: str = "") -> dict[str, Any]:
  """Writes this worker's missing shards of `items`; `make_records()` is only called when one is missing.

  A `retry_errors` exception stops the run before completing the shard it was writing and is re-raised as its
  own type with what was kept and `retry_hint` appended.
  """
  storage.makedirs(out)
  pin_config(out, config)
  by_shard: dict[int, list[Keyed]] = collections.defaultdict(list)
  for item in items:
    by_shard[shard_of(item.query_id, num_shards)].append(item)
  mine = [s for s in range(num_shards) if s % num_workers == worker_index]
  todo = [s for s in mine if not storage.exists(storage.join(out, shard_name(split, s, num_shards)))]
  print(f"worker {worker_index}/{num_workers}: {len(mine)} shards, {len(mine) - len(todo)} already "
        f"complete, {sum(len(by_shard[s]) for s in todo)} queries to {desc}", file=sys.stderr)
  skipped: dict[str, str] = {}
  if todo:
    make = make_records()
    with tqdm.tqdm(total=sum(len(by_shard[s]) for s in todo), unit="query", desc=desc) as progress:
      for done, s in enumerate(todo):
        try:
          info = write_shard(storage.join(out, shard_name(split, s, num_shards)), s, by_shard[s], make, batch,
                             progress)
        except retry_errors as e:
          raise type(e)(f"{e}; stopped before completing shard {s} ({done} of {len(todo)} shards written by this "
                        f"run, kept): run the same command again{retry_hint}") from e
        skipped.update(info["skipped"])
  manifest = write_manifest(out, split, num_shards, config)
  for query_id, reason in sorted(skipped.items()):
    print(f"skipped query {query_id!r}: {reason}", file=sys.stderr)
  print(f"worker {worker_index}: {len(todo)} shards written, {len(skipped)} bad queries skipped; "
        f"manifest {'written' if manifest else 'pending other workers'}", file=sys.stderr)
  return {"shards_written": todo, "skipped": skipped, "manifest": manifest}
