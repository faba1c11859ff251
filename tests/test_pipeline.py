"""The indexed TFRecord source: equals a sequential read, manifest checks, bad input named, and it feeds
`python -m o1jax.train` (a tiny random transformers Llama) that resumes at the same example after a restore, and
after a corrupt record stopped it (with `config.data.skip_bad`).

Shards are written by `data_tools.shards.write_shard` (its writer, sidecar and manifest path) from records
built directly (no LLM): the synthetic world's records in the `data_tools.record` layout.
"""
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import tqdm
import transformers

from data_tools import record as record_layout
from data_tools import shards
from o1jax import templates, train
from o1jax.data import batching, pipeline, synthetic, tfrecord
from o1jax.tokenizer import SpecialIds
from o1jax.training import sources

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = synthetic.SyntheticSpec(num_topics=4, docs_per_topic=4, queries_per_doc=2)  # 32 records
NUM_SHARDS = 3


class _Prebuilt:
  """Stands in for the LLM + committee stage: its records are already built."""

  def records(self, chunk, bad):
    del bad
    return chunk


def thought_record(r: dict) -> record_layout.ThoughtRecord:
  return record_layout.ThoughtRecord(
      query_id=r["query_id"], query=r["query"], thoughts=(r["thought"], "w1 w2"), chosen=0,
      positives=tuple(r["positives"]), negatives=tuple(r["negatives"]), positive_ids=(), negative_ids=(),
      committee_members=("bm25",), committee_weights=np.ones(1, np.float32),
      committee_scores=np.array([[2.0, 1.0]], np.float32), vote="soft", vote_totals=np.array([0.7, 0.3], np.float32))


def write_dataset(out: pathlib.Path) -> pathlib.Path:
  """Shards of the synthetic records (record n in shard n % NUM_SHARDS) and their manifest.json."""
  out.mkdir(parents=True, exist_ok=True)
  records = [thought_record(r) for r in synthetic.make_records(SPEC)]
  with tqdm.tqdm(disable=True) as progress:
    for s in range(NUM_SHARDS):
      shards.write_shard(out / shards.shard_name("train", s, NUM_SHARDS), s, records[s::NUM_SHARDS],
                         _Prebuilt().records, batch=4, progress=progress)
  manifest = shards.write_manifest(out, "train", NUM_SHARDS, {"test": 1})
  assert manifest is not None and manifest["num_records"] == len(records)
  return out / "manifest.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
  return write_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def copy(dataset, tmp_path) -> pathlib.Path:
  """A private copy of the dataset directory to damage; returns its manifest."""
  shutil.copytree(dataset.parent, tmp_path / "data")
  return tmp_path / "data" / "manifest.json"


def sequential(manifest: pathlib.Path) -> list[dict]:
  """Every record by a plain sequential read of the shards with data_tools' own reader."""
  out = []
  for s in range(NUM_SHARDS):
    for r in record_layout.read_shard(manifest.parent / shards.shard_name("train", s, NUM_SHARDS)):
      out.append({"query_id": r.query_id, "query": r.query, "thought": r.thought, "positives": list(r.positives),
                  "negatives": list(r.negatives)})
  return out


def shard_path(manifest: pathlib.Path, s: int) -> pathlib.Path:
  return manifest.parent / shards.shard_name("train", s, NUM_SHARDS)


def test_indexed_source_equals_a_sequential_read(dataset):
  expected = sequential(dataset)
  assert len(expected) == 32
  with pipeline.open_source([dataset]) as source:
    assert len(source) == 32 and source.counts() == [11, 11, 10]
    assert [source[i] for i in range(len(source))] == expected
    assert source[-1] == expected[-1] and source[17] == expected[17]  # random access, any order
    assert source.index_nbytes == 8 * len(source)  # the index, not the data, is in memory
    with pytest.raises(IndexError, match="record 32 out of range: 32 records"):
      source[32]
  with pytest.raises(ValueError, match="from a closed TFRecordSource"):
    source[0]
  # A glob and the same file named twice give the same records in the same order.
  pattern = str(dataset.parent / "train-*-of-*.tfrecord")
  with pipeline.open_source([pattern, str(shard_path(dataset, 0))]) as by_glob:
    assert list(by_glob) == expected and not by_glob.skipped
  # The synthetic records themselves, shard by shard.
  records = synthetic.make_records(SPEC)
  assert [r["query_id"] for r in expected] == [r["query_id"] for s in range(3) for r in records[s::3]]


def test_processes_take_their_rows_of_the_same_global_batch(dataset):
  tokenizer = synthetic.make_tokenizer(SPEC)
  special = SpecialIds.from_tokenizer(tokenizer)
  spec = batching.BatchSpec(8, 4, templates.Lengths(query=8, query_thought=16, doc=12), seed=5)
  whole = batching.Batcher(pipeline.open_source([dataset]), tokenizer, special, spec).batch(5)
  parts = [batching.Batcher(pipeline.open_source([dataset], process_index=p, process_count=2), tokenizer, special,
                            spec, process_index=p, process_count=2).batch(5) for p in range(2)]
  in_memory = batching.Batcher(sequential(dataset), tokenizer, special, spec).batch(5)
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    np.testing.assert_array_equal(in_memory[key], value)


def test_manifest_missing_shard(copy):
  shard_path(copy, 1).unlink()
  with pytest.raises(pipeline.ManifestError, match=r"manifest.json: shard 1: file .*train-00001-of-00003.tfrecord "
                                                   r"is missing"):
    pipeline.open_source([copy])


def corrupt_byte(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))


def record_offsets(path: pathlib.Path) -> list[int]:
  offsets, offset = [], 0
  for data in tfrecord.read_records(path):
    offsets.append(offset)
    offset += 16 + len(data)
  return offsets


def test_manifest_checksum_mismatch_is_caught_by_the_verifying_process(copy):
  path = shard_path(copy, 2)
  third = record_offsets(path)[3]
  corrupt_byte(path, third + 12 + 5)  # inside record 3's payload: framing intact
  with pytest.raises(pipeline.ManifestError, match=r"shard 2: .*train-00002-of-00003.tfrecord has SHA-256 "
                                                   r"[0-9a-f]{64}, the manifest lists [0-9a-f]{64}"):
    pipeline.open_source([copy])  # one process verifies every shard
  # Of two processes, process 0 verifies shards 0 and 2; process 1 only indexes shard 2 and, if it read the
  # corrupt record before process 0 failed the job, would still stop at its data CRC.
  with pytest.raises(pipeline.ManifestError, match="shard 2"):
    pipeline.open_source([copy], process_index=0, process_count=2)
  with pipeline.open_source([copy], process_index=1, process_count=2) as source:
    with pytest.raises(tfrecord.TFRecordError, match=rf"train-00002-of-00003.tfrecord: record 3 at byte offset "
                                                     rf"{third}: data CRC mismatch"):
      source[11 + 11 + 3]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_shards=4), r"num_shards=4 but the listed shards are \[0, 1, 2\]"),
    (lambda m: m["shards"][0].pop("sha256"), r"shards\[0\]: missing field\(s\) \['sha256'\]"),
    (lambda m: m.update(num_records=31), "num_records=31 is not the sum of the shard counts"),
    (lambda m: (m["shards"][1].update(num_records=12), m.update(num_records=33)),
     "shard 1: 11 records in train-00001-of-00003.tfrecord, the manifest lists 12"),
])
def test_manifest_inconsistencies_are_named(copy, edit, message):
  manifest = json.loads(copy.read_text())
  edit(manifest)
  copy.write_text(json.dumps(manifest))
  with pytest.raises(pipeline.ManifestError, match=message):
    pipeline.open_source([copy])


def test_bad_crc_and_truncation_are_named_or_skipped_and_counted(dataset, copy):
  path = shard_path(copy, 0)
  offsets = record_offsets(path)
  corrupt_byte(path, offsets[4] + 12 + 3)  # record 4's payload
  with pipeline.open_source([path]) as source:  # the header-only index does not read payloads
    assert len(source) == 11
    with pytest.raises(tfrecord.TFRecordError, match=rf"train-00000-of-00003.tfrecord: record 4 at byte offset "
                                                     rf"{offsets[4]}: data CRC mismatch \(corrupt record\)"):
      source[4]
  # skip_bad finds it at start-up; it keeps its index (so the count and the data order are those of the intact
  # data), and reading it still fails: the Batcher puts another record in its place.
  with pipeline.open_source([path], skip_bad=True) as source:
    assert len(source) == 11 and [str(s) for s in source.skipped] == [
        f"{path}: record 4 at byte offset {offsets[4]}: data CRC mismatch (corrupt record)"]
    assert [source[i]["query_id"] for i in range(11) if i != 4] == [
        r["query_id"] for i, r in enumerate(sequential(dataset)[:11]) if i != 4]
    with pytest.raises(tfrecord.TFRecordError, match="record 4 at byte offset"):
      source[4]

  corrupt_byte(path, offsets[6] + 2)  # record 6's length: its header CRC no longer matches
  with pytest.raises(tfrecord.TFRecordError, match=rf"record 6 at byte offset {offsets[6]}: length CRC mismatch"):
    pipeline.open_source([path])
  with pipeline.open_source([path], skip_bad=True) as source:
    assert len(source) == 6 and len(source.skipped) == 2
    assert str(source.skipped[1]).endswith("length CRC mismatch (corrupt header); rest of the file skipped")

  cut = shard_path(copy, 1)
  offsets = record_offsets(cut)
  cut.write_bytes(cut.read_bytes()[:offsets[9] + 20])  # record 9 ends early
  with pytest.raises(tfrecord.TFRecordError, match=rf"train-00001-of-00003.tfrecord: record 9 at byte offset "
                                                   rf"{offsets[9]}: truncated record"):
    pipeline.open_source([cut])
  with pipeline.open_source([cut], skip_bad=True) as source:
    assert len(source) == 9 and "truncated record" in str(source.skipped[0])


def test_train_reads_skip_bad_from_the_config(copy, caplog):
  path = shard_path(copy, 2)
  offsets = record_offsets(path)
  corrupt_byte(path, offsets[1] + 12 + 3)  # record 1's payload
  data = sources.DataSource(kind="tfrecord", train_files=(str(path),), skip_bad=False)
  with pytest.raises(tfrecord.TFRecordError, match="record 1 at byte offset"):
    list(sources.load_records(data))
  with caplog.at_level(logging.WARNING):
    source = sources.load_records(dataclasses.replace(data, skip_bad=True))
  assert len(source) == len(offsets)
  assert f"skipped a bad training record: {path}: record 1 at byte offset {offsets[1]}" in caplog.text


def test_a_glob_refuses_a_shard_set_with_a_shard_missing_and_warns_of_an_empty_file(copy, caplog):
  pattern = str(copy.parent / "train-*-of-*.tfrecord")
  shard_path(copy, 1).unlink()
  with pytest.raises(FileNotFoundError, match=r"train-\*-of-\*.tfrecord': 1 shard\(s\) of the set are missing, e.g. "
                                              r".*/train-00001-of-00003.tfrecord"):
    pipeline.open_source([pattern])
  with pipeline.open_source([shard_path(copy, 0), shard_path(copy, 2)]) as part:  # named one by one: a choice
    assert len(part) == 21
  shard_path(copy, 1).write_bytes(b"")
  with caplog.at_level(logging.WARNING):
    with pipeline.open_source([pattern]) as source:
      assert source.counts() == [11, 0, 10]
  assert "train-00001-of-00003.tfrecord: empty TFRecord file: it adds no training records" in caplog.text


def test_records_missing_a_feature_and_missing_files_are_named(tmp_path):
  with tfrecord.TFRecordWriter(tmp_path / "bad.tfrecord") as w:
    w.write_example({"query_id": ["x"], "query": ["t0"], "positives": ["t0 e1"]})
    w.write_example({"query_id": ["y"], "query": ["t0"], "positives": []})
    w.write_example({"query_id": ["z"], "query": [3], "positives": ["t0 e1"]})
  with pipeline.open_source([tmp_path / "bad.tfrecord"]) as source:
    assert source[0]["thought"] == "" and source[0]["negatives"] == []
    with pytest.raises(tfrecord.TFRecordError, match=r"bad.tfrecord: record 1 at byte offset \d+: missing feature "
                                                     r"'positives'"):
      source[1]
    with pytest.raises(tfrecord.TFRecordError, match=r"record 2 at byte offset \d+: feature 'query' is a int64_list, "
                                                     r"expected a bytes_list"):
      source[2]
  with pytest.raises(FileNotFoundError, match="no TFRecord files match"):
    pipeline.open_source([str(tmp_path / "none-*")])
  with pytest.raises(FileNotFoundError, match="not found"):
    pipeline.open_source([str(tmp_path / "none.tfrecord")])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
  return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def make_tiny_model(path: pathlib.Path) -> pathlib.Path:
  """A tiny random transformers Llama (safetensors) with the synthetic world's word-level tokenizer at `path`."""
  tokenizer = synthetic.make_tokenizer(SPEC)
  tokenizer.save_pretrained(path)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return path


def train_args(model_dir: pathlib.Path, manifest: pathlib.Path, ckpt: pathlib.Path) -> list[str]:
  return [f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", "--config.model.source=hf",
          f"--config.model.path={model_dir}", "--config.data.kind=tfrecord",
          f"--config.data.train_files=('{manifest}',)", "--config.train.steps=6", "--config.log.every=1",
          "--config.log.tensorboard_dir=", f"--config.checkpoint.dir={ckpt}", "--config.checkpoint.every=3",
          "--config.checkpoint.keep=3", "--config.checkpoint.async_save=False"]


def test_trains_from_the_shards_and_resumes_at_the_same_example(dataset, tiny_model_dir, tmp_path):
  ckpt = tmp_path / "ckpt"
  uninterrupted = train.main(train_args(tiny_model_dir, dataset, ckpt))
  assert [h["step"] for h in uninterrupted] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(h["loss_ctr"]) and h["loss_gen"] > 0 for h in uninterrupted)
  # 32 records / 16 queries per batch: two batches per epoch, so steps 4-6 cross an epoch boundary.
  assert len({h["loss"] for h in uninterrupted}) == 6
  # Interrupted after step 3: the later checkpoint never existed; resume restores step 3 and its data position.
  shutil.rmtree(ckpt / "6")
  resumed = train.main(train_args(tiny_model_dir, dataset, ckpt))
  assert [h["step"] for h in resumed] == [4, 5, 6]
  for before, after in zip(uninterrupted[3:], resumed):
    for key in ("loss", "loss_ctr", "loss_gen", "acc_top1", "grad_norm"):
      assert after[key] == before[key], (before["step"], key)


def train_cli(cache: pathlib.Path, *argv: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.run([sys.executable, "-m", "o1jax.train", *argv], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_a_corrupt_record_stops_the_run_after_a_save_and_skip_bad_resumes_at_the_same_example(
    copy, tiny_model_dir, tmp_path):
  """Plain file patterns (no manifest checksums): a corrupt payload is found only when a batch reads it."""
  # A record of batch 1 (the second half of epoch 0's permutation of the 32 records, shuffle seed 0).
  record = int(np.random.default_rng([0, 0]).permutation(32)[20])
  shard = [s for s in range(NUM_SHARDS) if record < sum([11, 11, 10][:s + 1])][0]
  local = record - sum([11, 11, 10][:shard])
  offset = record_offsets(shard_path(copy, shard))[local]
  corrupt_byte(shard_path(copy, shard), offset + 12 + 3)
  pattern = str(copy.parent / "train-*-of-*.tfrecord")
  cache = tmp_path / "xla_cache"

  def run(name, *overrides):
    args = [*train_args(tiny_model_dir, pathlib.Path(pattern), tmp_path / name), "--config.train.steps=4",
            f"--config.log.jsonl={tmp_path / name}.jsonl", *overrides]
    return train_cli(cache, *args), tmp_path / f"{name}.jsonl"

  stopped, log = run("ckpt")
  assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
  assert stopped.stderr.strip().splitlines()[-1].endswith(
      f"record {local} at byte offset {offset}: data CRC mismatch (corrupt record). The state after step 1 is saved. "
      "Rerun with --config.data.skip_bad=True to put the next usable record in its place and resume at the same "
      "example")
  saved = json.loads((tmp_path / "ckpt" / "1" / "data" / "metadata").read_text())
  assert (saved["next_batch"], saved["records"]) == (1, 32)  # batch 1 is the one that stopped the run
  resumed, log = run("ckpt", "--config.data.skip_bad=True")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"skip_bad: record {record} replaced by the next usable record: " in resumed.stderr
  assert "resumed from" in resumed.stderr
  assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
