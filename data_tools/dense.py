"""What `data_tools.mine` and `data_tools.score` share: a dense encoder from a `--model` spec, and the options,
input and output of a command that rewrites every record of a shard directory.

A spec is `minilm` (the offline all-MiniLM-L6-v2), an o1jax training checkpoint directory, an exported o1jax
Hugging Face directory (its tokenizer has o1jax's special tokens), or any other sentence-transformers (or plain
transformers) directory. `check_model` resolves it without loading any weights; `load_encoder` loads it.

Every encoder gives L2-normalised float32 vectors, so its similarity is the cosine, equal to the dot product that
exact and ScaNN search maximise. o1jax models embed queries without thinking (METHOD §2's no-thought form
`<query> q </query> <thought> <emb>`) and documents as `title text <emb>`; sentence-transformers models embed
both with `encode`. Corpus embeddings are cached on disk (`o1jax.retrieval.embedding_cache`), keyed by the model,
its settings and the exact texts.

Both commands read a `manifest.json` (counts and checksums verified) and write a new shard directory through
`data_tools.shards` (resumable, `--num_workers` / `--worker_index`; `config.json` pins the settings and the
input manifest's SHA-256). Bad options end the command with one line (`run`), before any model or data loads.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import os
import pathlib
from typing import Any

import numpy as np

from data_tools import shards
from data_tools.record import ThoughtRecord, read_shard
from o1jax import checkpoint
from o1jax.data.pipeline import open_source
from o1jax.eval import baselines
from o1jax.tokenizer import SPECIAL_TOKENS, load_tokenizer

O1JAX, SENTENCE_TRANSFORMERS = "o1jax", "sentence-transformers"
MINILM = "minilm"

Encode = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, d] unit vectors


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  kind: str  # O1JAX or SENTENCE_TRANSFORMERS
  path: str | None  # absolute; None: the offline MiniLM

  @property
  def name(self) -> str:
    """What records name as their miner or teacher."""
    if self.kind == O1JAX:
      return f"o1jax:{self.path} (no thinking)"
    return f"{SENTENCE_TRANSFORMERS}:{self.path or 'all-MiniLM-L6-v2'}"


def _has_o1jax_tokens(path: pathlib.Path) -> bool:
  try:
    vocab = load_tokenizer(path).get_vocab()
  except (OSError, ValueError):  # no tokenizer files transformers can read: not an o1jax export
    return False
  return all(t in vocab for t in SPECIAL_TOKENS)


def check_model(option: str, value: str) -> ModelSpec:
  """The model `value` names, checked (packages, directory contents) before any weights load; a ValueError
  names `option` otherwise."""
  if value == MINILM:
    spec = ModelSpec(SENTENCE_TRANSFORMERS, None)
  else:
    path = pathlib.Path(value).absolute()
    if not path.is_dir():
      raise ValueError(f"{option}={value}: no such directory (expected an o1jax checkpoint, an exported o1jax "
                       f"model, a sentence-transformers model directory or {MINILM})")
    if (path / checkpoint.RUN_DIR / checkpoint.MODEL_CONFIG).is_file():
      return ModelSpec(O1JAX, str(path))
    if (path / "config.json").is_file() and _has_o1jax_tokens(path):
      return ModelSpec(O1JAX, str(path))
    spec = ModelSpec(SENTENCE_TRANSFORMERS, str(path))
  try:
    baselines.check_sentence_model(spec.path)
  except ValueError as e:
    raise ValueError(f"{option}={value}: {e}") from None
  return spec


@dataclasses.dataclass(frozen=True)
class DenseEncoder:
  name: str  # the ModelSpec's
  encode_queries: Encode
  encode_docs: Encode  # uncached: passages of a few records
  encode_corpus: Encode  # cached on disk


def load_encoder(spec: ModelSpec, batch_size: int = 64, cache_dir: str | os.PathLike | None = None) -> DenseEncoder:
  """Loads the model of `spec` (`batch_size`: sentence-transformers' encode batch; `cache_dir`: the corpus
  embedding cache, default $O1JAX_CACHE or ~/.cache/o1jax)."""
  if spec.kind == O1JAX:
    from o1jax.retrieval.retriever import Retriever  # pylint: disable=g-import-not-at-top (loads the model stack)
    retriever = Retriever.from_pretrained(spec.path)
    return DenseEncoder(
        spec.name, lambda texts: retriever.encode_queries(texts, think=0),
        lambda texts: retriever.embed_sequences(retriever.doc_sequences(texts)),
        lambda texts: retriever.encode_docs(texts, cache_dir))
  from o1jax.retrieval.sentence_encoder import SentenceEncoder  # pylint: disable=g-import-not-at-top (loads torch)
  encoder = SentenceEncoder(spec.path)

  def encode(texts: Sequence[str]) -> np.ndarray:
    return encoder.encode(texts, batch_size)

  return DenseEncoder(spec.name, encode, encode, baselines.cached_doc_encoder(encoder, batch_size, cache_dir))


class Parser(argparse.ArgumentParser):
  """argparse whose errors (unknown options, bad numbers) raise ValueError: `run` prints them as one line."""

  def error(self, message: str):
    raise ValueError(message)


def parser(prog: str, description: str) -> Parser:
  """The options of both commands; each adds its own."""
  p = Parser(prog=prog, description=description)
  p.add_argument("--input", required=True, help="manifest.json of a shard directory")
  p.add_argument("--model", required=True, help=f"o1jax checkpoint or export directory, sentence-transformers "
                 f"directory, or {MINILM} (the offline all-MiniLM-L6-v2)")
  p.add_argument("--out", required=True, help="the new shard directory")
  p.add_argument("--split", default="train", help="shard file name prefix")
  p.add_argument("--num_shards", type=int, default=None, help="default: the input's")
  p.add_argument("--num_workers", type=int, default=1)
  p.add_argument("--worker_index", type=int, default=0)
  p.add_argument("--queries_per_batch", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=64, help="sentence-transformers encode batch")
  p.add_argument("--skip_bad", action="store_true", help="leave bad queries out (listed in the manifest) instead "
                 "of stopping at the first")
  return p


# Settings that do not change the records: left out of config.json, so workers and restarts may differ.
RUNTIME_ONLY = ("out", "num_workers", "worker_index", "queries_per_batch", "batch_size", "skip_bad", "cache_dir")


@dataclasses.dataclass(frozen=True)
class Job:
  args: argparse.Namespace
  manifest: pathlib.Path
  model: ModelSpec
  config: dict[str, Any]  # what config.json pins


def check_job(args: argparse.Namespace, checks: Sequence[tuple[str, bool, str]]) -> Job:
  """The shared options checked, then `checks` (option, ok, what it must be); raises ValueError naming one."""
  manifest = pathlib.Path(args.input)
  if manifest.name != "manifest.json" or not manifest.is_file():
    raise ValueError(f"--input={args.input}: expected the manifest.json of a shard directory (written by "
                     "python -m data_tools.synthesize, mine or score)")
  content = shards.read_json(manifest)
  if args.num_shards is None:
    args.num_shards = content.get("num_shards")
  for option, ok, want in [
      ("num_shards", isinstance(args.num_shards, int) and args.num_shards >= 1, ">= 1"),
      ("num_workers", args.num_workers >= 1, ">= 1"),
      ("worker_index", 0 <= args.worker_index < args.num_workers, f"in [0, --num_workers={args.num_workers})"),
      ("queries_per_batch", args.queries_per_batch >= 1, ">= 1"), ("batch_size", args.batch_size >= 1, ">= 1"),
      *checks]:
    if not ok:
      raise ValueError(f"--{option} must be {want}, got {getattr(args, option)}")
  if os.path.realpath(args.out) == os.path.realpath(manifest.parent):
    raise ValueError(f"--out={args.out} is the input's directory: the input shards would pass for finished output")
  model = check_model("--model", args.model)
  config = {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_ONLY}
  # The same files however a restart names them.
  config.update(input=str(manifest.absolute()), model=model.path or MINILM)
  if "corpus" in config:
    config["corpus"] = os.path.abspath(config["corpus"])
  config["input_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
  return Job(args, manifest, model, config)


# (the job) -> the function that rewrites a batch of records, setting bad ones aside (shards.MakeRecords).
MakeRewriter = Callable[[Job], shards.MakeRecords]


def rewrite(job: Job, make: MakeRewriter, desc: str) -> dict[str, Any]:
  """Writes this worker's missing shards of the input's records rewritten by `make(job)`, built only when a
  shard is missing; returns `shards.write_shards`' summary."""
  with open_source([job.manifest]) as source:  # verifies the manifest's counts and checksums
    files = list(source.files)
  records: list[ThoughtRecord] = [record for path in files for record in read_shard(path)]
  args = job.args
  return shards.write_shards(args.out, args.split, args.num_shards, args.num_workers,
                             args.worker_index, records, lambda: make(job), job.config, args.queries_per_batch, desc)


def set_aside(job: Job, query_id: str, problem: str, bad: dict[str, str]) -> None:
  """A record that cannot be rewritten: stops the run naming it, or with --skip_bad is listed and left out."""
  if not job.args.skip_bad:
    raise ValueError(f"query {query_id!r}: {problem} (--skip_bad leaves such queries out)")
  bad[query_id] = problem
