"""Faults and bad input in thought synthesis, against a real chat server on 127.0.0.1 and tiny grouped data.

An expert outage must leave the shard to the next run (never drop its queries), empty answers must never become
thoughts, the API key must appear in no output or file, and every bad option or input ends the command with
one line naming it.
"""
import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import threading

import pytest

from data_tools import shards, synthesize
from data_tools.chat_server import ChatServer, ServerFault
from data_tools.explore import ExpertError
from data_tools.record import read_shard

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_QUERIES, NUM_SHARDS, K = 12, 4, 2
KEY_ENV, KEY = "O1JAX_TEST_EXPERT_KEY", "sk-test-7f3a9c1e5b"


def _grouped(path: pathlib.Path) -> pathlib.Path:
  records = [{"query_id": f"q{i:02d}", "query": f"question {i} about topic {i % 3}",
              "pos": [f"passage {i} answers question {i} about topic {i % 3}"], "neg": [f"unrelated text {i}"]}
             for i in range(NUM_QUERIES)]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _asked(messages) -> str:
  return messages[-1]["content"].rsplit("Query: ", 1)[1].split("\n")[0]


def _echo(messages, body) -> str:
  return f"perhaps {_asked(messages)} (sample {body['seed'] % 1000})"


def _args(data, out, server, *extra):
  return [f"--grouped={data}", f"--out={out}", f"--num_shards={NUM_SHARDS}", "--expert=http", "--model=echo",
          f"--base_url={server.base_url}", f"--k={K}", "--members=bm25", "--num_examples=1",
          "--queries_per_batch=2", "--concurrency=1", "--max_attempts=1", *extra]


def _shard_bytes(out: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tfrecord"))}


def _files_text(out: pathlib.Path) -> str:
  return "".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(out.rglob("*")) if p.is_file())


class Outage:
  """Answers the first `healthy` requests, then fails every request with HTTP 500 quoting the Authorization
  header (the API key) until `recover()`; counts the requests it answers."""

  def __init__(self, healthy: int):
    self.healthy, self.down, self.answered = healthy, False, 0
    self._lock = threading.Lock()

  def recover(self) -> None:
    self.healthy, self.down, self.answered = float("inf"), False, 0

  def __call__(self, messages, body) -> str:
    with self._lock:
      if self.healthy == 0:
        self.down = True
      if self.down:
        raise ServerFault(500, "upstream model unavailable", quote_authorization=True)
      self.healthy -= 1
      self.answered += 1
    return _echo(messages, body)


def test_outage_leaves_the_shard_to_a_rerun_that_synthesizes_exactly_the_missing_shards(tmp_path, monkeypatch):
  data = _grouped(tmp_path / "groups.jsonl")
  with ChatServer(_echo) as server:
    synthesize.main(_args(data, tmp_path / "reference", server))
  reference = _shard_bytes(tmp_path / "reference")
  sizes = {name: len(read_shard(tmp_path / "reference" / name)) for name in reference}
  first = next(name for name in sorted(sizes) if sizes[name])  # shards are written in index order
  expert = Outage(healthy=K * sizes[first] + 1)  # fails part way through the second non-empty shard

  out = tmp_path / "out"
  with ChatServer(expert, api_key=KEY) as server:
    args = _args(data, out, server, "--skip_bad", f"--api_key_env={KEY_ENV}")
    cli = subprocess.run([sys.executable, "-m", "data_tools.synthesize", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: KEY})
    assert expert.down, "the outage must begin during the run"
    last = cli.stderr.strip().splitlines()[-1]
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert last.startswith("python -m data_tools.synthesize: query 'q") and "HTTP 500" in last
    assert "run the same command again" in last and "<redacted>" in last
    assert KEY not in cli.stdout + cli.stderr
    done = _shard_bytes(out)
    assert first in done and len(done) < NUM_SHARDS
    assert {name: reference[name] for name in done} == done  # what was completed is whole and right
    assert all(json.loads((out / f"{name}.json").read_text())["skipped"] == {} for name in done)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))

    expert.recover()
    monkeypatch.setenv(KEY_ENV, KEY)
    result = synthesize.main(args)
  missing = sorted(set(reference) - set(done))
  assert [shards.shard_name("train", s, NUM_SHARDS) for s in result["shards_written"]] == missing
  assert expert.answered == K * sum(sizes[name] for name in missing)  # nothing asked twice
  assert result["skipped"] == {} and result["manifest"]["num_records"] == NUM_QUERIES
  assert _shard_bytes(out) == reference
  assert KEY not in _files_text(out)


def test_rejected_query_is_skipped_and_the_echoed_api_key_is_redacted(tmp_path, monkeypatch, capsys):
  def rejects_q03(messages, body):
    if _asked(messages).startswith("question 3 "):
      raise ServerFault(400, "prompt rejected", quote_authorization=True)
    return _echo(messages, body)

  data = _grouped(tmp_path / "groups.jsonl")
  monkeypatch.setenv(KEY_ENV, KEY)
  with ChatServer(rejects_q03, api_key=KEY) as server:
    with pytest.raises(ExpertError, match=r"query 'q03' candidate 0: .* answered HTTP 400") as strict:
      synthesize.main(_args(data, tmp_path / "strict", server, f"--api_key_env={KEY_ENV}"))
    result = synthesize.main(_args(data, tmp_path / "lenient", server, f"--api_key_env={KEY_ENV}", "--skip_bad"))
  assert KEY not in str(strict.value) and "Bearer <redacted>" in str(strict.value)
  assert list(result["skipped"]) == ["q03"] and "Bearer <redacted>" in result["skipped"]["q03"]
  manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
  assert manifest["num_skipped"] == 1 and manifest["num_records"] == NUM_QUERIES - 1
  captured = capsys.readouterr()
  assert "skipped query 'q03'" in captured.err
  assert KEY not in captured.out + captured.err + _files_text(tmp_path)


def test_empty_answers_are_not_thoughts(tmp_path):
  asked = collections.Counter()

  def sometimes_empty(messages, body):
    query = _asked(messages)
    asked[query] += 1
    if query.startswith("question 3 "):
      return " \n\t"  # every candidate of q03 is empty
    if query.startswith("question 5 ") and asked[query] == 1:
      return ""  # q05's first candidate is empty, its second is not
    return _echo(messages, body)

  data = _grouped(tmp_path / "groups.jsonl")
  with ChatServer(sometimes_empty) as server:
    with pytest.raises(ExpertError, match=r"query 'q03': the expert answered all 2 candidates with empty text"):
      synthesize.main(_args(data, tmp_path / "strict", server))
    asked.clear()
    result = synthesize.main(_args(data, tmp_path / "lenient", server, "--skip_bad"))
  assert list(result["skipped"]) == ["q03"] and result["manifest"]["num_skipped"] == 1
  records = {r.query_id: r for p in sorted((tmp_path / "lenient").glob("train-*.tfrecord")) for r in read_shard(p)}
  assert sorted(records) == [f"q{i:02d}" for i in range(NUM_QUERIES) if i != 3]
  q05 = records.pop("q05")
  assert len(q05.thoughts) == 1 and q05.thought.startswith("perhaps question 5 ") and q05.chosen == 0
  assert q05.committee_scores.shape == (1, 1) and q05.vote_totals.shape == (1,)
  assert all(len(r.thoughts) == K and r.committee_scores.shape == (1, K) for r in records.values())


def _run_cli(argv) -> str:
  """The message `synthesize.run` exits with (what `python -m data_tools.synthesize` prints)."""
  with pytest.raises(SystemExit) as exit_info:
    synthesize.run(argv)
  return str(exit_info.value.code)


@pytest.mark.parametrize("option,message", [
    ("--limit=-1", "--limit must be >= 1 (leave it out for every query), got -1"),
    ("--limit=0", "--limit must be >= 1"),
    ("--num_negatives=-3", "--num_negatives must be >= 0, got -3"),
    ("--k=0", "--k must be >= 1, got 0"),
    ("--top_p=2", "--top_p must be in (0, 1], got 2.0"),
    ("--temperature=nan", "--temperature must be >= 0, got nan"),
    ("--max_attempts=0", "--max_attempts must be >= 1, got 0"),
    ("--num_workers=0", "--num_workers must be >= 1, got 0"),
    ("--members=bm25,bm42", "--members must name distinct members among bm25, st, got 'bm25,bm42'"),
    ("--member_weights=1,2", "--member_weights must be 1 non-negative numbers, not all 0, one per member of "
                             "--members=bm25, got '1,2'"),
    ("--member_weights=heavy", "--member_weights must be 1 non-negative numbers"),
])
def test_bad_options_are_named(option, message, tmp_path, capsys):
  argv = [f"--grouped={tmp_path / 'groups.jsonl'}", f"--out={tmp_path / 'out'}", "--model=m", "--members=bm25",
          option]
  assert _run_cli(argv) == "2"
  assert capsys.readouterr().err.splitlines()[-1].startswith(f"python -m data_tools.synthesize: error: {message}")
  assert not (tmp_path / "out").exists()


def _unreadable_grouped(tmp_path):
  path = _grouped(tmp_path / "groups.jsonl")
  lines = path.read_bytes().splitlines(keepends=True)
  path.write_bytes(lines[0] + lines[1].replace(b"question", b"qu\xe9stion") + b"".join(lines[2:]))
  return [f"--grouped={path}"], rf"{path}, line 2, field '<utf-8>': not UTF-8 text \(byte 0xe9, byte \d+ of the line\)"


def _missing_dataset(tmp_path):
  return [f"--dataset={tmp_path / 'nowhere'}"], rf"{tmp_path / 'nowhere'}: neither corpus\.jsonl nor corpus\.jsonl\.gz"


def _corrupt_config(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "config.json").write_text('{"k": 2,')
  return ([f"--grouped={_grouped(tmp_path / 'groups.jsonl')}"],
          rf"{tmp_path / 'out' / 'config.json'}: not valid JSON \(Expecting")


def _out_is_a_file(tmp_path):
  (tmp_path / "out").write_text("not a directory")
  return [f"--grouped={_grouped(tmp_path / 'groups.jsonl')}"], rf"File exists: '{tmp_path / 'out'}'"


def _key_not_set(tmp_path):
  return ([f"--grouped={_grouped(tmp_path / 'groups.jsonl')}", "--expert=http", "--base_url=http://127.0.0.1:9/v1",
           "--api_key_env=O1JAX_TEST_UNSET_KEY"], "environment variable O1JAX_TEST_UNSET_KEY .* is not set")


def _unknown_st_model(tmp_path):
  return ([f"--grouped={_grouped(tmp_path / 'groups.jsonl')}", "--expert=http", "--base_url=http://127.0.0.1:9/v1",
           "--members=bm25,st", "--st_model=no-such-org/no-such-model"],
          "--st_model=no-such-org/no-such-model: cannot load the sentence-transformers model")


@pytest.mark.parametrize("make", [_unreadable_grouped, _missing_dataset, _corrupt_config, _out_is_a_file,
                                  _key_not_set, _unknown_st_model], ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_naming_it(make, tmp_path, monkeypatch):
  monkeypatch.delenv("O1JAX_TEST_UNSET_KEY", raising=False)
  source, pattern = make(tmp_path)
  # The case's own options come last: argparse keeps the last value of an option given twice.
  message = _run_cli([f"--out={tmp_path / 'out'}", "--model=m", "--members=bm25", "--num_examples=1", *source])
  assert "\n" not in message and message.startswith("python -m data_tools.synthesize: ")
  assert re.search(pattern, message), message
