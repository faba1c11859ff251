"""Dense hard-negative mining and teacher scoring (`data_tools.mine`, `data_tools.score`) on real SciFact train
queries and a corpus of their positives and 120 other SciFact documents.

References we did not write: sentence-transformers' own `encode` (MiniLM) and transformers' forward pass of the
tiny o1jax model, ranked by numpy. Mined negatives are the rank window of that exact ranking, never a positive;
ScaNN and exact search agree; scores are the reference cosines (over the teacher temperature); a killed run resumes writing only the missing
shards, byte for byte those of an uninterrupted run; bad options end in one line.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_tools import dense, mine, score, shards
from data_tools.record import ThoughtRecord, read_shard
from o1jax.data import readers
from o1jax.retrieval.sentence_encoder import offline_minilm_path
from o1jax.templates import document_text

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_QUERIES, NUM_OTHER_DOCS = 24, 120
TIE = 1e-5  # reference and tool scores differ by float32 rounding: a gap this small may order either way


class Data:
  def __init__(self, directory: pathlib.Path, shared_dir: pathlib.Path):
    beir = readers.load_beir(shared_dir / "data" / "beir-scifact", "train")
    self.query_ids = sorted(beir.queries)[:NUM_QUERIES]
    self.queries = {q: beir.queries[q] for q in self.query_ids}
    self.positive_ids = {q: sorted(d for d, rel in beir.qrels[q].items() if rel > 0) for q in self.query_ids}
    judged = {d for ids in self.positive_ids.values() for d in ids}
    others = [d for d in beir.corpus if d not in judged][:NUM_OTHER_DOCS]
    self.doc_ids = [d for d in beir.corpus if d in judged] + others
    self.texts = [document_text(beir.corpus[d].title, beir.corpus[d].text) for d in self.doc_ids]
    self.text_of = dict(zip(self.doc_ids, self.texts))
    self.corpus = directory / "corpus.jsonl"
    with open(self.corpus, "w", encoding="utf-8") as f:
      for d in self.doc_ids:
        f.write(json.dumps({"_id": d, "title": beir.corpus[d].title, "text": beir.corpus[d].text}) + "\n")
    # Every other record without positive ids: its positives are excluded by text.
    records = [ThoughtRecord(
        query_id=q, query=self.queries[q], thoughts=(f"perhaps {self.queries[q]}", "a second thought"), chosen=1,
        positives=tuple(self.text_of[d] for d in self.positive_ids[q]), negatives=("an old negative",),
        positive_ids=tuple(self.positive_ids[q]) if i % 2 else (), negative_ids=("old",),
        committee_members=("bm25",), committee_weights=np.ones(1, np.float32),
        committee_scores=np.array([[1.0, 2.0]], np.float32), vote="soft",
        vote_totals=np.array([0.3, 0.7], np.float32),
        positive_scores=np.full(len(self.positive_ids[q]), 0.5, np.float32),
        negative_scores=np.array([0.1], np.float32),
        teacher="an old teacher", task_type="scifact") for i, q in enumerate(self.query_ids)]
    self.input = directory / "input"
    shards.write_shards(self.input, "train", 3, 1, 0, records, lambda: lambda chunk, bad: chunk, {"made": "by test"},
                        8, "input")
    self.manifest = self.input / "manifest.json"
    self.cache = directory / "cache"


@pytest.fixture(scope="module")
def data(shared_dir, tmp_path_factory):
  return Data(tmp_path_factory.mktemp("mine"), shared_dir)


@pytest.fixture(scope="module")
def minilm_scores(data):
  """[queries, docs] cosines of sentence-transformers' own MiniLM embeddings, in float64."""
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  model = SentenceTransformer(offline_minilm_path(), device="cpu")
  docs = model.encode(data.texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64)
  queries = model.encode([data.queries[q] for q in data.query_ids], normalize_embeddings=True,
                         convert_to_numpy=True).astype(np.float64)
  return {q: row for q, row in zip(data.query_ids, queries @ docs.T)}


def run_mine(data, out, *extra, model="minilm"):
  return mine.main([f"--input={data.manifest}", f"--corpus={data.corpus}", f"--model={model}", f"--out={out}",
                    f"--cache_dir={data.cache}", *extra])


def records_of(out: pathlib.Path) -> dict[str, ThoughtRecord]:
  return {r.query_id: r for path in sorted(out.glob("train-*.tfrecord")) for r in read_shard(path)}


def window(scores: np.ndarray, start: int, end: int) -> tuple[set[int], set[int]]:
  """(rows surely at ranks [start, end) of an exact search by `scores`, rows that a near-tie at the window's edge
  may put on either side)."""
  ranked = np.concatenate([[np.inf], np.sort(scores)[::-1], [-np.inf]])  # ranked[r + 1]: the score at rank r
  end = min(end, len(scores))
  above, first_in, last_in, below = ranked[start], ranked[start + 1], ranked[end], ranked[end + 1]
  inside = {i for i, s in enumerate(scores) if below + TIE < s < above - TIE}
  outside = {i for i, s in enumerate(scores) if s < last_in - TIE or s > first_in + TIE}
  return inside, set(range(len(scores))) - inside - outside


def check_window(data, records, scores, start, end, num_negatives):
  """Negatives are ranks [start, end) of the reference ranking, positives out, `num_negatives` of them or all."""
  ties = 0
  for q in data.query_ids:
    r = records[q]
    rows = [data.doc_ids.index(d) for d in r.negative_ids]
    assert r.negatives == tuple(data.texts[i] for i in rows)
    assert not set(r.negative_ids) & set(data.positive_ids[q])
    inside, near = window(scores[q], start, end)
    positives = {data.doc_ids.index(d) for d in data.positive_ids[q]}
    assert set(rows) <= inside | near, q
    candidates = (inside | near) - positives
    if len(candidates) <= num_negatives:
      assert inside - positives <= set(rows), q  # all of them
    else:
      assert len(rows) == num_negatives
    assert all(scores[q][a] >= scores[q][b] - TIE for a, b in zip(rows, rows[1:]))  # in rank order
    ties += len(near)
  assert ties <= len(data.query_ids) // 4  # the comparison is not vacuous


@pytest.fixture(scope="module")
def mined(data, tmp_path_factory):
  """--range=10:100 --num_negatives=15 into 4 shards: also the reference of the resume test."""
  out = tmp_path_factory.mktemp("mined") / "out"
  result = run_mine(data, out, "--range=10:100", "--num_negatives=15", "--search=exact", "--num_shards=4")
  return out, result


def test_mined_negatives_are_sampled_from_ranks_10_to_100_of_an_exact_search(data, minilm_scores, mined):
  out, result = mined
  assert result["manifest"]["num_records"] == NUM_QUERIES and result["skipped"] == {}
  records = records_of(out)
  check_window(data, records, minilm_scores, 10, 100, 15)
  original = {r.query_id: r for r in (r for p in sorted(data.input.glob("train-*.tfrecord")) for r in read_shard(p))}
  for q, r in records.items():
    assert r.miner == ("sentence-transformers:all-MiniLM-L6-v2; exact search; 15 sampled from ranks [10, 100), "
                       "positives excluded; seed 0")
    assert (r.query, r.thoughts, r.chosen, r.positives, r.positive_ids, r.vote, r.task_type) == (
        original[q].query, original[q].thoughts, 1, original[q].positives, original[q].positive_ids, "soft", "scifact")
    np.testing.assert_array_equal(r.committee_scores, original[q].committee_scores)
    # The old teacher scores belonged to the old negatives.
    assert r.teacher == "" and r.positive_scores.size == 0 and r.negative_scores.size == 0


def test_sampling_depends_on_seed_and_query_id_only(data, mined, tmp_path):
  records = records_of(mined[0])
  run_mine(data, tmp_path / "two", "--range=10:100", "--num_negatives=15", "--search=exact", "--num_shards=2")
  resharded = records_of(tmp_path / "two")
  assert {q: r.negative_ids for q, r in resharded.items()} == {q: r.negative_ids for q, r in records.items()}
  run_mine(data, tmp_path / "seed", "--range=10:100", "--num_negatives=15", "--search=exact", "--seed=1")
  reseeded = records_of(tmp_path / "seed")
  assert sum(reseeded[q].negative_ids != records[q].negative_ids for q in records) >= NUM_QUERIES - 2


@pytest.mark.parametrize("search", ["exact", "scann"])
def test_a_short_window_is_taken_whole_by_exact_and_scann_search(data, minilm_scores, tmp_path, search):
  run_mine(data, tmp_path, "--range=3:12", "--num_negatives=20", f"--search={search}")
  records = records_of(tmp_path)
  check_window(data, records, minilm_scores, 3, 12, 20)
  assert all(f"; {search} search; 20 sampled from ranks [3, 12)" in r.miner for r in records.values())


def test_scores_are_minilm_cosines(data, minilm_scores, tmp_path):
  run_mine(data, tmp_path / "mined", "--range=10:100", "--num_negatives=3", "--search=exact", "--num_shards=2")
  result = score.main([f"--input={tmp_path / 'mined' / 'manifest.json'}", "--model=minilm", f"--out={tmp_path / 's'}"])
  assert result["manifest"]["num_shards"] == 2 and result["manifest"]["num_records"] == NUM_QUERIES
  scored, before = records_of(tmp_path / "s"), records_of(tmp_path / "mined")
  for q, r in scored.items():
    row = minilm_scores[q]
    # Logits: the cosine over the default temperature, the student's tau 0.02.
    np.testing.assert_allclose(r.positive_scores * 0.02,
                               [row[data.doc_ids.index(d)] for d in data.positive_ids[q]], atol=1e-5)
    np.testing.assert_allclose(r.negative_scores * 0.02, [row[data.doc_ids.index(d)] for d in r.negative_ids],
                               atol=1e-5)
    assert r.teacher == "sentence-transformers:all-MiniLM-L6-v2; cosine / 0.02"
    assert (r.negatives, r.negative_ids, r.miner, r.thoughts) == (
        before[q].negatives, before[q].negative_ids, before[q].miner, before[q].thoughts)


@pytest.fixture(scope="module")
def tiny_o1jax(smollm2_gguf, tmp_path_factory):
  from test_retriever import tiny_model_dir  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path)
  from o1jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  return tiny_model_dir(load_tokenizer(smollm2_gguf), tmp_path_factory.mktemp("tiny") / "hf", seed=2)


def test_an_o1jax_model_mines_and_scores_without_thinking(data, tiny_o1jax, tmp_path):
  """References: transformers' forward pass of the export over the no-thought query and document sequences."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from o1jax.retrieval.retriever import Retriever  # pylint: disable=g-import-not-at-top
  assert dense.check_model("--model", str(tiny_o1jax)) == dense.ModelSpec(dense.O1JAX, str(tiny_o1jax))
  assert dense.check_model("--model", offline_minilm_path()).kind == dense.SENTENCE_TRANSFORMERS
  retriever = Retriever.from_pretrained(tiny_o1jax)  # only its token-id templates are used
  model = transformers.AutoModel.from_pretrained(tiny_o1jax, torch_dtype=torch.float32).eval()

  def embed(sequences):
    with torch.no_grad():
      vectors = np.stack([model(torch.tensor([s])).last_hidden_state[0, -1].numpy() for s in sequences])
    return vectors.astype(np.float64) / np.linalg.norm(vectors, axis=1, keepdims=True)

  docs = embed(retriever.doc_sequences(data.texts))
  queries = embed([s[0] for s in retriever.query_sequences([data.queries[q] for q in data.query_ids])])
  scores = {q: row for q, row in zip(data.query_ids, queries @ docs.T)}
  run_mine(data, tmp_path / "mined", "--range=2:10", "--num_negatives=6", "--search=exact", model=tiny_o1jax)
  records = records_of(tmp_path / "mined")
  check_window(data, records, scores, 2, 10, 6)
  name = f"o1jax:{tiny_o1jax} (no thinking)"
  assert all(r.miner.startswith(f"{name}; exact search; 6 sampled") for r in records.values())
  score.main([f"--input={tmp_path / 'mined' / 'manifest.json'}", f"--model={tiny_o1jax}", f"--out={tmp_path / 's'}",
              "--temperature=1"])
  for q, r in records_of(tmp_path / "s").items():
    np.testing.assert_allclose(r.negative_scores, [scores[q][data.doc_ids.index(d)] for d in r.negative_ids],
                               atol=1e-5)
    np.testing.assert_allclose(r.positive_scores, [scores[q][data.doc_ids.index(d)] for d in data.positive_ids[q]],
                               atol=1e-5)
    assert r.teacher == f"{name}; cosine / 1"


def test_kill_and_resume_writes_only_the_missing_shards(data, mined, tmp_path):
  reference, _ = mined
  out = tmp_path / "killed"
  out.mkdir()
  blocker = out / (shards.shard_name("train", 2, 4) + ".tmp")
  os.mkfifo(blocker)  # opening it to write shard 2 blocks: the run is killed there, shards 0 and 1 complete
  args = [f"--input={data.manifest}", f"--corpus={data.corpus}", "--model=minilm", f"--out={out}",
          f"--cache_dir={data.cache}", "--range=10:100", "--num_negatives=15", "--search=exact", "--num_shards=4"]
  proc = subprocess.Popen([sys.executable, "-m", "data_tools.mine", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
  deadline = time.time() + 240
  while len(list(out.glob("train-*.tfrecord"))) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.5)
  assert proc.poll() is None, "the run should be blocked writing shard 2"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = {p.name: p.read_bytes() for p in out.glob("train-*.tfrecord")}
  assert sorted(before) == [shards.shard_name("train", s, 4) for s in (0, 1)]
  assert not (out / "manifest.json").exists()
  blocker.unlink()
  blocker.write_bytes(b"\x00half a record")  # what a kill mid-write leaves
  result = mine.main(args)
  assert result["shards_written"] == [2, 3]
  after = {p.name: p.read_bytes() for p in out.glob("train-*.tfrecord")}
  assert {k: after[k] for k in before} == before
  assert after == {p.name: p.read_bytes() for p in reference.glob("train-*.tfrecord")}
  assert (json.loads((out / "manifest.json").read_text())["shards"] ==
          json.loads((reference / "manifest.json").read_text())["shards"])
  assert not list(out.glob("*.tmp"))


def test_a_query_without_candidates_stops_the_run_or_is_skipped(data, minilm_scores, tmp_path):
  """--range=0:1: where MiniLM ranks a positive first, nothing is left to sample."""
  top_is_positive = sorted(q for q in data.query_ids
                           if data.doc_ids[int(np.argmax(minilm_scores[q]))] in data.positive_ids[q])
  assert 0 < len(top_is_positive) < NUM_QUERIES
  with pytest.raises(ValueError, match=r"query '\d+': no negative in ranks \[0, 1\) once its positives are "
                                       r"excluded \(--skip_bad leaves such queries out\)"):
    run_mine(data, tmp_path / "strict", "--range=0:1", "--num_negatives=1", "--search=exact")
  result = run_mine(data, tmp_path / "lenient", "--range=0:1", "--num_negatives=1", "--search=exact", "--skip_bad")
  assert sorted(result["skipped"]) == top_is_positive
  assert result["manifest"]["num_skipped"] == len(top_is_positive)
  records = records_of(tmp_path / "lenient")
  assert sorted(records) == sorted(set(data.query_ids) - set(top_is_positive))
  assert all(len(r.negative_ids) == 1 for r in records.values())


def test_output_directory_refuses_other_settings(data, mined):
  with pytest.raises(ValueError, match=r"config\.json: this output directory was made with other settings "
                                       r"\{'num_negatives': \(15, 14\)\}"):
    run_mine(data, mined[0], "--range=10:100", "--num_negatives=14", "--search=exact", "--num_shards=4")


def one_line_exit(module, argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    shards.run_command(module.PROG, module.main, argv)
  message = str(exit_info.value.code)
  assert "\n" not in message and message.startswith(module.PROG + ": ")
  return message[len(module.PROG) + 2:]


@pytest.mark.parametrize("extra, expected", [
    (["--range=100:10"], r"--range=100:10: need 0 <= START < END"),
    (["--range=ten"], r"--range=ten: expected START:END"),
    (["--num_negatives=0"], r"--num_negatives must be >= 1, got 0"),
    (["--num_shards=0"], r"--num_shards must be >= 1, got 0"),
    (["--worker_index=2", "--num_workers=2"], r"--worker_index must be in \[0, --num_workers=2\), got 2"),
    (["--search=faiss"], r"argument --search: invalid choice: 'faiss'"),
    (["--seed=x"], r"argument --seed: invalid int value: 'x'"),
    (["--bogus=1"], r"unrecognized arguments: --bogus=1"),
])
def test_bad_mine_options_end_in_one_line(data, tmp_path, capsys, extra, expected):
  argv = [f"--input={data.manifest}", f"--corpus={data.corpus}", "--model=minilm", f"--out={tmp_path / 'o'}", *extra]
  assert re.search(expected, one_line_exit(mine, argv, capsys))
  assert not (tmp_path / "o").exists()


def test_bad_paths_end_in_one_line(data, tmp_path, capsys):
  good = {"input": str(data.manifest), "corpus": str(data.corpus), "model": "minilm", "out": str(tmp_path / "o")}
  for option, value, expected in [
      ("input", str(data.corpus), "expected the manifest.json of a shard directory"),
      ("corpus", str(tmp_path / "none.jsonl"), "no such file or directory"),
      ("corpus", str(tmp_path), "neither corpus.jsonl nor corpus.jsonl.gz exists"),
      ("model", str(tmp_path / "none"), "no such directory (expected an o1jax checkpoint"),
      ("model", str(tmp_path), "has neither modules.json nor config.json"),
      ("out", str(data.input), "is the input's directory"),
  ]:
    argv = [f"--{k}={value if k == option else v}" for k, v in good.items()]
    assert one_line_exit(mine, argv, capsys).startswith(f"--{option}={value}"), option
    assert expected in one_line_exit(mine, argv, capsys)
  message = one_line_exit(score, [f"--input={data.manifest}", "--model=nowhere", f"--out={tmp_path / 's'}"], capsys)
  assert message.startswith("--model=nowhere: no such directory")
  assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_cli_exit_status_and_no_traceback(data, tmp_path):
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "data_tools.score", f"--input={data.manifest}", "--model=minilm",
                         f"--out={tmp_path}", "--num_shards=-1"], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == "python -m data_tools.score: --num_shards must be >= 1, got -1"
  assert "Traceback" not in proc.stderr and time.time() - start < 60
