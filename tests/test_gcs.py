"""`gs://` paths for training, against a Cloud Storage emulator on 127.0.0.1 (`gcp-storage-emulator`, in this
process, so the bytes it serves can be counted): the indexed reader reads a record with one ranged request of
that record's bytes; TFRecords write and read in a bucket; the checkpoint lock is a lease object; and
`python -m o1jax.train` trains from shards in the bucket, checkpoints, metrics and TensorBoard events into it, is
killed with SIGKILL, resumes with every later loss equal to an uninterrupted run's, and the checkpoint in the
bucket is exported (`python -m o1jax.export`), loaded for evaluation and evaluated by `python -m o1jax.eval` with
its outputs written into the bucket.
"""
import collections
from http import HTTPStatus
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import fsspec
from gcp_storage_emulator import server as emulator_server
import jax
import numpy as np
import pytest

from data_tools import ingest
from o1jax import checkpoint, lease, storage
from o1jax.data import pipeline, tfrecord
from o1jax.eval import __main__ as eval_cli
from o1jax.retrieval import loading
from o1jax.retrieval.retriever import Retriever
import test_pipeline  # pylint: disable=wrong-import-order  (tests/ is on sys.path)
from test_eval_cli import write_beir  # pylint: disable=wrong-import-order

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUCKET = "o1jax-test"
STEPS, EVERY = 12, 2
LOSSES = ("loss", "loss_ctr", "loss_gen", "acc_top1", "grad_norm")


_MEDIA = re.compile(r"^(?:/download)?/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>[^?]+)\?(?:.*&)?alt=media")


@pytest.fixture(scope="module")
def emulator():
  """The emulator's address (also in STORAGE_EMULATOR_HOST for this process and the CLIs it starts) and a
  Counter of the body bytes it served per request path.

  Real Cloud Storage sends an object's generation (`x-goog-generation`) with its bytes; this emulator does not,
  and tensorstore needs it to read the OCDBT manifest orbax writes beside each step's arrays: the emulator's
  response gets the header from the emulator's own record of the object."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  served = collections.Counter()
  close = emulator_server.Response.close

  def instrumented_close(response):
    handler, content = response._handler, response._content  # pylint: disable=protected-access
    served[handler.path.split("?")[0]] += len(content.encode() if isinstance(content, str) else content)
    media = _MEDIA.match(handler.path)
    if media and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = handler.storage.get_file_obj(media["bucket"], urllib.parse.unquote(media["object"]))
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    close(response)

  emulator_server.Response.close = instrumented_close
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  old = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  try:
    yield os.environ["STORAGE_EMULATOR_HOST"], served
  finally:
    server.stop()
    emulator_server.Response.close = close
    if old is None:
      del os.environ["STORAGE_EMULATOR_HOST"]
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = old


def upload(local: pathlib.Path, remote: str) -> None:
  for path in sorted(local.iterdir()):
    storage.put_file(path, storage.join(remote, path.name))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, emulator) -> tuple[pathlib.Path, str]:
  """(local manifest, the same shards and manifest in the bucket)."""
  manifest = test_pipeline.write_dataset(tmp_path_factory.mktemp("shards"))
  upload(manifest.parent, f"gs://{BUCKET}/data")
  return manifest, f"gs://{BUCKET}/data/manifest.json"


def test_the_indexed_reader_reads_one_record_with_one_ranged_request(dataset, emulator):
  local, remote = dataset
  served = emulator[1]
  with pipeline.open_source([local]) as expected, pipeline.open_source([remote]) as source:
    assert source.counts() == expected.counts() == [11, 11, 10]
    assert [source[i] for i in range(len(source))] == [expected[i] for i in range(len(expected))]
    shard = source.files[1]
    assert shard == f"gs://{BUCKET}/data/train-00001-of-00003.tfrecord"
    offsets = test_pipeline.record_offsets(test_pipeline.shard_path(local, 1))
    served.clear()
    assert source[11 + 5] == expected[11 + 5]
    record_bytes = offsets[6] - offsets[5]
    # A header and a body: two ranged GETs of that record's bytes, nothing else of the shard.
    assert sum(served.values()) == record_bytes, (served, record_bytes)
    assert record_bytes * 8 < storage.size(shard)
  # Globs and the missing-shard check work on bucket paths too.
  pattern = f"gs://{BUCKET}/data/train-*-of-*.tfrecord"
  with pipeline.open_source([pattern]) as by_glob:
    assert len(by_glob) == 32 and by_glob.files[0] == f"gs://{BUCKET}/data/train-00000-of-00003.tfrecord"
  with pytest.raises(FileNotFoundError, match=r"TFRecord file 'gs://.*/none.tfrecord' not found"):
    pipeline.open_source([f"gs://{BUCKET}/data/none.tfrecord"])


def test_tfrecords_write_and_read_in_a_bucket(emulator, tmp_path):
  path = f"gs://{BUCKET}/records/x.tfrecord"
  with tfrecord.TFRecordWriter(path) as writer:
    for i in range(5):
      writer.write_example({"query_id": [f"q{i}"], "query": ["t0"], "positives": ["t0 e1"]})
  assert not writer.tmp_path.exists()
  assert [tfrecord.feature_text(e, "query_id") for e in tfrecord.read_examples(path)] == [[f"q{i}"] for i in range(5)]
  with pytest.raises(RuntimeError, match="interrupted"):
    with tfrecord.TFRecordWriter(f"gs://{BUCKET}/records/y.tfrecord") as writer:
      writer.write(b"x")
      raise RuntimeError("interrupted")
  assert not storage.exists(f"gs://{BUCKET}/records/y.tfrecord")  # nothing published


def test_ingest_writes_its_shards_and_manifest_into_a_bucket(emulator, shared_dir, tmp_path):
  triples = shared_dir / "data" / "msmarco-train-toy" / "triples.tsv"
  argv = [f"--triples={triples}", "--num_shards=3", "--keep_missing"]
  ingest.main([*argv, f"--out={tmp_path / 'local'}"])
  remote = f"gs://{BUCKET}/ingested"
  result = ingest.main([*argv, f"--out={remote}"])
  assert result["manifest"]["num_records"] > 0
  assert ingest.main([*argv, f"--out={remote}"])["shards_written"] == []  # complete shards are found in the bucket
  assert storage.read_bytes(f"{remote}/train-00001-of-00003.tfrecord") == \
      (tmp_path / "local" / "train-00001-of-00003.tfrecord").read_bytes()
  with pipeline.open_source([tmp_path / "local" / "manifest.json"]) as expected, \
      pipeline.open_source([f"{remote}/manifest.json"]) as source:
    assert [source[i] for i in range(len(source))] == [expected[i] for i in range(len(expected))]


def test_the_lock_is_a_lease_object(emulator):
  directory = f"gs://{BUCKET}/locked"
  path = storage.join(directory, checkpoint.LOCK_FILE)
  with checkpoint.exclusive(directory):
    owner = json.loads(storage.read_bytes(path))
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert float(storage.object_generation(path)[1]["heartbeat"]) > time.time() - 10
    with pytest.raises(checkpoint.DirectoryLocked, match=rf"{path} is held by host {socket.gethostname()}, pid "
                                                         rf"{os.getpid()}"):
      with checkpoint.exclusive(directory):
        pass
  assert not storage.exists(path)  # released
  # A lock left by a trainer on another machine is taken over once its heartbeat is stale, not before.
  other = {"host": "elsewhere", "pid": 1, "boot_id": "x"}
  storage.create_new(path, json.dumps(other).encode(), {"heartbeat": f"{time.time():.3f}"})
  with pytest.raises(checkpoint.DirectoryLocked, match="held by host elsewhere, pid 1"):
    with checkpoint.exclusive(directory):
      pass
  generation = storage.object_generation(path)[0]
  assert storage.set_metadata(path, {"heartbeat": f"{time.time() - lease.STALE_S - 1:.3f}"}, generation)
  with checkpoint.exclusive(directory):
    assert json.loads(storage.read_bytes(path))["pid"] == os.getpid()
  assert not storage.exists(path)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


def train_args(model_dir: pathlib.Path, manifest: str, ckpt: str, name: str) -> list[str]:
  return [f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", "--config.model.source=hf",
          f"--config.model.path={model_dir}", "--config.data.kind=tfrecord",
          f"--config.data.train_files=('{manifest}',)", f"--config.train.steps={STEPS}", "--config.log.every=1",
          f"--config.log.tensorboard_dir={f'gs://{BUCKET}/{name}/tb' if ckpt else ''}",
          f"--config.log.jsonl=gs://{BUCKET}/{name}/metrics.jsonl", f"--config.checkpoint.dir={ckpt}",
          f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=3"]


def start(cache: pathlib.Path, *argv: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.Popen([sys.executable, "-m", "o1jax.train", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  return stderr


def metrics(name: str) -> dict[int, dict]:
  lines = storage.read_text(f"gs://{BUCKET}/{name}/metrics.jsonl").splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  assert len(steps) == len(set(steps)), steps  # each step once
  return {json.loads(line)["step"]: json.loads(line) for line in lines}


def test_train_in_a_bucket_killed_resumes_bitwise_then_exports_and_evaluates(dataset, emulator, compile_cache,
                                                                             tmp_path):
  model_dir = test_pipeline.make_tiny_model(tmp_path / "tiny_llama")
  _, manifest = dataset
  reference = start(compile_cache, *train_args(model_dir, manifest, "", "reference"))
  finish(reference)
  expected = metrics("reference")
  assert sorted(expected) == list(range(1, STEPS + 1))

  ckpt = f"gs://{BUCKET}/run/ckpt"
  killed = start(compile_cache, *train_args(model_dir, manifest, ckpt, "run"))
  while not storage.exists(f"{ckpt}/4/commit_success.txt"):
    assert killed.poll() is None, killed.communicate()[1][-3000:]
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert killed.returncode == -signal.SIGKILL
  saved = checkpoint.Checkpointer(ckpt, EVERY, 3)
  resume_from = saved.latest_step()
  saved.close()
  assert resume_from is not None and 4 <= resume_from < STEPS, resume_from

  stderr = finish(start(compile_cache, *train_args(model_dir, manifest, ckpt, "run")))
  assert f"resumed from {ckpt} step {resume_from}" in stderr
  assert "taking over the lock of a trainer that is gone" in stderr
  resumed = metrics("run")
  assert sorted(resumed)[-1] == STEPS
  for step in range(resume_from + 1, STEPS + 1):
    for key in LOSSES:
      assert resumed[step][key] == expected[step][key], (step, key)
  assert storage.glob(f"gs://{BUCKET}/run/tb/events.out.tfevents.*")
  assert not storage.exists(f"{ckpt}/{checkpoint.LOCK_FILE}")
  assert json.loads(storage.read_text(f"{ckpt}/run/train_config.json"))["checkpoint"]["dir"] == ckpt

  # Export from the bucket: the merged weights of the last step, as orbax reads them from a local copy.
  local_ckpt = tmp_path / "ckpt_copy"
  fsspec.filesystem("gs").get(ckpt, str(local_ckpt), recursive=True)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-m", "o1jax.export", f"--checkpoint={ckpt}", f"--out={tmp_path / 'hf'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from_bucket = loading.restore_weights(ckpt)
  from_disk = loading.restore_weights(local_ckpt)
  assert from_bucket.step == from_disk.step == STEPS
  jax.tree.map(np.testing.assert_array_equal, from_bucket.params, from_disk.params)
  # Evaluation loads the bucket's checkpoint: the same vectors as the exported directory gives.
  docs = ["t0 e1 e2", "t1 e3"]
  exported = Retriever.from_pretrained(tmp_path / "hf").encode_docs(docs)
  in_bucket = Retriever.from_pretrained(ckpt)
  assert in_bucket.fingerprint != loading.checkpoint_fingerprint(local_ckpt)
  np.testing.assert_allclose(in_bucket.encode_docs(docs, cache_dir=tmp_path / "cache"), exported, rtol=1e-5,
                             atol=1e-6)
  # python -m o1jax.eval on the bucket's checkpoint, its run files, metrics and summary written into the bucket:
  # the same as a local evaluation of the local copy.
  beir = write_beir(tmp_path / "beir", {"d1": ("", "t0 e1 e2"), "d2": ("", "t1 e3"), "d3": ("", "t2 e4")},
                    {"q1": "t0 c1", "q2": "t1 c2"}, {"q1": {"d1": 1}, "q2": {"d2": 1}})
  common = [f"--dataset={beir}", "--think=off", "--baselines=", "--search=exact", f"--cache_dir={tmp_path / 'c'}"]
  out = f"gs://{BUCKET}/run/eval"
  remote = eval_cli.main([f"--checkpoint={ckpt}", f"--out={out}", *common])
  local = eval_cli.main([f"--checkpoint={local_ckpt}", f"--out={tmp_path / 'eval'}", *common])
  assert remote["beir"]["o1jax no-think"].metrics == local["beir"]["o1jax no-think"].metrics
  for name in ("summary.json", "o1jax_no-think.trec", "o1jax_no-think.metrics.json"):
    assert storage.exists(f"{out}/{name}"), name
  assert storage.read_text(f"{out}/o1jax_no-think.trec") == (tmp_path / "eval" / "o1jax_no-think.trec").read_text()
