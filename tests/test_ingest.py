"""python -m data_tools.ingest on real MS MARCO, TREC DL and SciFact records: every field kept, the same records
from JSON lines, `datasets` JSON and Parquet, bad records named, resumable, re-voted, explored, trained on."""
import gzip
import json
import math
import pathlib

import numpy as np
import pytest

from data_tools import ingest
from data_tools import shards as shard_layout
from data_tools.chat_server import ChatServer, ServerFault
from data_tools.committee import BM25Member, Committee
from data_tools.explore import ExpertUnavailable
from data_tools.record import read_shard
from o1jax.data import pipeline, readers

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECORD_FIELDS = ("query_id", "query", "thoughts", "chosen", "positives", "negatives", "positive_ids", "negative_ids",
                 "committee_members", "committee_weights", "committee_scores", "vote", "vote_totals",
                 "positive_scores", "negative_scores", "teacher", "miner", "task_type")


def _dl21(shared_dir) -> pathlib.Path:
  return shared_dir / "data" / "msmarco-v2-dl21-train"


def _groups(shared_dir, n):
  with gzip.open(_dl21(shared_dir) / "train_groups.jsonl.gz", "rt") as f:
    groups = [json.loads(line) for line in f]
  return [g for g in groups if len(g["pos"]) >= 2 and len(g["neg"]) >= 3][:n]


def _reference_rows(shared_dir):
  """Real DL21 queries and passages in the reference's layout, with every field and each thought rule."""
  rows = []
  for i, g in enumerate(_groups(shared_dir, 6)):
    candidates = [f"{g['query']} -- candidate {c}: {g['pos'][c % 2][:60]}" for c in range(3)]
    row = {"query": g["query"], "pos": g["pos"][:2], "neg": g["neg"][:3], "pos_ids": g["pos_ids"][:2],
           "neg_ids": g["neg_ids"][:3], "pos_scores": [9.5 - i, 7.25], "neg_scores": [1.5, -0.5, 0.25 * i],
           "all_thought": candidates, "model2scores": {"stella": [70.5, 80.25, 60.0], "bge": [0.5, 0.25, 0.75 + i]},
           "type": "normal" if i % 2 else "symmetric", "thought": candidates[1]}
    if i != 1:
      row["query_id"] = g["query_id"]  # record 1 is named by its line
    if i == 2:
      row["thought"] = f"  {g['query']}: a thought the committee never scored  "
    if i == 3:
      del row["thought"]  # chosen by a soft vote of the stored scores
    if i == 4:
      row["all_thought"][0] = ""  # an empty candidate is dropped with its scores
      del row["pos_scores"], row["neg_scores"]
    rows.append(row)
  return rows


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _records(out) -> dict[str, object]:
  return {r.query_id: r for p in sorted(out.glob("train-*.tfrecord")) for r in read_shard(p)}


def _assert_same_records(a, b):
  assert sorted(a) == sorted(b)
  for query_id in a:
    for field in RECORD_FIELDS:
      left, right = getattr(a[query_id], field), getattr(b[query_id], field)
      if isinstance(left, np.ndarray):
        np.testing.assert_array_equal(left, right, err_msg=f"{query_id}.{field}")
      else:
        assert left == right, (query_id, field)


def _softmax_totals(scores):
  probs = np.exp(scores - scores.max(1, keepdims=True))
  return (probs / probs.sum(1, keepdims=True)).sum(0)


@pytest.fixture(scope="module")
def reference_run(shared_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("reference")
  rows = _reference_rows(shared_dir)
  path = _write_jsonl(tmp / "train.jsonl", rows)
  out = tmp / "out"
  result = ingest.main([f"--input={path}", f"--out={out}", "--num_shards=3", "--teacher=bge-reranker-v2"])
  return rows, path, out, result


def test_reference_records_keep_every_field(reference_run):
  rows, _, out, result = reference_run
  assert result["skipped"] == {} and result["manifest"]["num_records"] == 6
  records = _records(out)
  for line, row in enumerate(rows, start=1):
    r = records[row.get("query_id", str(line))]
    assert r.query == row["query"] and r.positives == tuple(row["pos"]) and r.negatives == tuple(row["neg"])
    assert r.positive_ids == tuple(row["pos_ids"]) and r.negative_ids == tuple(row["neg_ids"])
    assert r.task_type == row["type"] and r.miner == ""
    members = sorted(row["model2scores"])
    kept = [c for c, t in enumerate(row["all_thought"]) if t]
    stored = np.array([[row["model2scores"][m][c] for c in kept] for m in members], np.float32)
    assert r.committee_members == tuple(members)
    np.testing.assert_array_equal(r.committee_weights, np.ones(len(members)))
    candidates = [row["all_thought"][c] for c in kept]
    if "thought" not in row:  # no thought: the stored scores choose by soft vote
      assert r.thoughts == tuple(candidates) and r.vote == "soft"
      np.testing.assert_allclose(r.vote_totals, _softmax_totals(stored), rtol=1e-6)
      assert r.chosen == int(np.argmax(_softmax_totals(stored)))
      np.testing.assert_array_equal(r.committee_scores, stored)
    elif row["thought"] in candidates:
      assert r.thoughts == tuple(candidates) and r.thought == row["thought"] and r.vote == "given"
      np.testing.assert_array_equal(r.committee_scores, stored)
      np.testing.assert_array_equal(r.vote_totals, np.eye(len(candidates))[candidates.index(row["thought"])])
    else:  # the data's own thought, never scored: appended, NaN scores
      assert r.thoughts == (*candidates, row["thought"]) and r.chosen == len(candidates) and r.vote == "given"
      np.testing.assert_array_equal(r.committee_scores[:, :-1], stored)
      assert np.isnan(r.committee_scores[:, -1]).all()
    if "pos_scores" in row:
      np.testing.assert_array_equal(r.positive_scores, np.float32(row["pos_scores"]))
      np.testing.assert_array_equal(r.negative_scores, np.float32(row["neg_scores"]))
      assert r.teacher == "bge-reranker-v2"
    else:
      assert r.positive_scores.size == r.negative_scores.size == 0 and r.teacher == ""
  assert records["2"].query == rows[1]["query"]  # no query_id: named by its line


def test_the_trainer_reads_what_was_kept(reference_run):
  _, _, out, _ = reference_run
  records = _records(out)
  with pipeline.open_source([out / "manifest.json"]) as source:
    read = [source[i] for i in range(len(source))]
  assert sorted(r["query_id"] for r in read) == sorted(records)
  for r in read:
    kept = records[r["query_id"]]
    assert (r["query"], r["thought"], r["positives"], r["negatives"]) == (
        kept.query, kept.thought, list(kept.positives), list(kept.negatives))
    if kept.teacher:
      np.testing.assert_array_equal(r["positive_scores"], kept.positive_scores)
      np.testing.assert_array_equal(r["negative_scores"], kept.negative_scores)
    else:
      assert "positive_scores" not in r


def test_datasets_json_and_parquet_ingest_to_the_same_records(reference_run, tmp_path):
  datasets = pytest.importorskip("datasets")
  rows, _, out, _ = reference_run
  table = datasets.Dataset.from_list(rows)
  table.to_json(tmp_path / "train.json")
  table.to_parquet(tmp_path / "train.parquet")
  assert "null" in (tmp_path / "train.json").read_text()  # fields a record lacks come back as null
  expected = _records(out)
  for name in ("train.json", "train.parquet"):
    ingest.main([f"--input={tmp_path / name}", f"--out={tmp_path / name}.out", "--num_shards=3",
                 "--teacher=bge-reranker-v2"])
    _assert_same_records(_records(tmp_path / f"{name}.out"), expected)


@pytest.fixture(scope="module")
def msmarco_files(shared_dir, tmp_path_factory):
  """collection.tsv, queries.tsv, TREC 4-column qrels and ids triples cut from the real DL21 files."""
  tmp = tmp_path_factory.mktemp("msmarco")
  corpus = readers.read_beir_corpus(_dl21(shared_dir) / "corpus.jsonl.gz")
  topics = readers.read_beir_queries(_dl21(shared_dir) / "queries.jsonl")
  qrels = readers.read_qrels(_dl21(shared_dir) / "qrels" / "dl21.tsv")
  judged = sorted(q for q in qrels if q in topics)[:4]
  picked = {q: sorted(d for d in qrels[q] if d in corpus)[:6] for q in judged}
  qrels_lines = [f"{q} 0 {d} {qrels[q][d]}" for q in judged[:3] for d in picked[q]]
  triples = [f"{judged[3]}\t{picked[judged[3]][0]}\t{picked[judged[3]][1]}",
             f"{judged[0]}\t{picked[judged[3]][2]}\t{picked[judged[3]][3]}",
             f"{judged[3]}\t{picked[judged[3]][0]}\t{picked[judged[3]][4]}"]
  pids = sorted({d for ds in picked.values() for d in ds})
  (tmp / "collection.tsv").write_text("".join(f"{d}\t{corpus[d].text}\n" for d in pids))
  (tmp / "queries.tsv").write_text("".join(f"{q}\t{topics[q]}\n" for q in judged))
  (tmp / "qrels.txt").write_text("\n".join(qrels_lines) + "\n")
  (tmp / "triples.tsv").write_text("\n".join(triples) + "\n")
  return tmp, corpus, topics, qrels, judged, picked


def test_msmarco_collection_queries_qrels_and_id_triples(msmarco_files, tmp_path):
  files, corpus, topics, qrels, judged, picked = msmarco_files
  result = ingest.main([f"--collection={files / 'collection.tsv'}", f"--queries={files / 'queries.tsv'}",
                        f"--qrels={files / 'qrels.txt'}", f"--triples={files / 'triples.tsv'}",
                        f"--out={tmp_path / 'out'}", "--num_shards=2", "--keep_missing"])
  assert result["manifest"]["config"]["format"] == "msmarco" and result["skipped"] == {}
  records = _records(tmp_path / "out")
  assert sorted(records) == sorted(judged)
  for q in judged:
    r = records[q]
    positives = [d for d in picked[q] if q in judged[:3] and qrels[q][d] > 0]
    negatives = [d for d in picked[q] if q in judged[:3] and qrels[q][d] <= 0]
    if q == judged[0]:
      positives.append(picked[judged[3]][2])
      negatives.append(picked[judged[3]][3])
    if q == judged[3]:
      positives, negatives = [picked[q][0]], [picked[q][1], picked[q][4]]
    assert r.query == topics[q] and r.positive_ids == tuple(positives)
    assert r.negative_ids == tuple(d for d in negatives if d not in positives)
    assert r.positives == tuple(corpus[d].text for d in r.positive_ids)
    assert r.negatives == tuple(corpus[d].text for d in r.negative_ids)
    assert r.thoughts == ("",) and r.vote == "none" and r.committee_members == ()


def test_msmarco_text_triples(shared_dir, tmp_path):
  path = shared_dir / "data" / "msmarco-train-toy" / "triples.tsv"
  ingest.main([f"--triples={path}", f"--out={tmp_path / 'out'}", "--num_shards=4", "--keep_missing"])
  expected: dict[str, dict] = {}
  for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    query, pos, neg = text.split("\t")
    group = expected.setdefault(query, {"id": str(line), "pos": [], "neg": []})
    group["pos"] += [pos] if pos not in group["pos"] else []
    group["neg"] += [neg] if neg not in group["neg"] else []
  records = _records(tmp_path / "out")
  assert len(records) == len(expected)
  for query, group in expected.items():
    r = records[group["id"]]
    assert r.query == query and r.positives == tuple(group["pos"])
    assert r.negatives == tuple(n for n in group["neg"] if n not in group["pos"])
    assert r.positive_ids == r.negative_ids == ()


def test_beir_directory_with_mined_negatives(shared_dir, tmp_path):
  scifact = shared_dir / "data" / "beir-scifact"
  ingest.main([f"--dataset={scifact}", "--split=train", f"--out={tmp_path / 'out'}", "--num_shards=2", "--limit=5",
               "--keep_missing", "--num_negatives=2"])
  beir = readers.load_beir(scifact, "train")
  records = _records(tmp_path / "out")
  assert sorted(records) == sorted(beir.queries)[:5]
  for q, r in records.items():
    assert r.query == beir.queries[q]
    assert r.positive_ids == tuple(sorted(d for d, g in beir.qrels[q].items() if g > 0))
    assert r.positives == tuple(f"{beir.corpus[d].title} {beir.corpus[d].text}".strip() for d in r.positive_ids)
    assert len(r.negative_ids) == 2 and not set(r.negative_ids) & set(r.positive_ids) and r.miner == "bm25"
    assert r.negatives == tuple(f"{beir.corpus[d].title} {beir.corpus[d].text}".strip() for d in r.negative_ids)


def _exit_message(argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    ingest.run(argv)
  return str(exit_info.value.code)


def test_bad_records_are_named_and_skip_bad_counts_them(shared_dir, tmp_path):
  rows = _reference_rows(shared_dir)
  bad_scores = dict(rows[2], pos_scores=[1.0])
  no_thought = {k: v for k, v in rows[4].items() if k not in ("thought", "all_thought", "model2scores")}
  lines = [json.dumps(rows[0]), json.dumps(rows[1]), json.dumps(bad_scores), '{"query": "broken',
           json.dumps(no_thought)]
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  message = _exit_message([f"--input={path}", f"--out={tmp_path / 'strict'}"])
  assert message == (f"python -m data_tools.ingest: {path}, line 3, field 'pos_scores': 1 scores for 2 passages")
  assert not (tmp_path / "strict" / "manifest.json").exists()
  result = ingest.main([f"--input={path}", f"--out={tmp_path / 'lenient'}", "--num_shards=2", "--skip_bad"])
  manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
  assert manifest["num_records"] == 2 and manifest["num_skipped"] == 3
  skipped = {k: v for s in manifest["shards"] for k, v in s["skipped"].items()}
  assert skipped == result["skipped"]
  assert sorted(skipped) == [f"{path}:3", f"{path}:4", f"{path}:5"]
  assert "malformed JSON" in skipped[f"{path}:4"] and "field 'thought': missing" in skipped[f"{path}:5"]
  assert sorted(_records(tmp_path / "lenient")) == sorted([rows[0]["query_id"], "2"])


@pytest.mark.parametrize("argv,message", [
    (["--input=x.jsonl", "--dataset=d"], "give the inputs of one format"),
    (["--format=beir", "--input=x.jsonl"], "--format=beir takes --dataset, got the inputs of reference"),
    (["--triples=t.tsv"], "--format=msmarco records carry no thoughts: pass --explore_missing"),
    (["--qrels=q.tsv", "--keep_missing"], "--qrels needs --collection and --queries"),
    (["--input=x.jsonl", "--explore_missing"], "--explore_missing needs --model"),
    (["--input=x.jsonl", "--num_negatives=3"], "--num_negatives=3 mines from a corpus"),
    (["--input=x.jsonl", "--members=bm25,bm42"], "--members must name distinct members among bm25, st"),
])
def test_bad_options_are_named_before_anything_loads(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    ingest.run([*argv, f"--out={tmp_path / 'out'}"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1].startswith(f"python -m data_tools.ingest: error: {message}")
  assert not (tmp_path / "out").exists()


def _missing_rows(shared_dir):
  """Six real queries; records 1 and 4 have no thought at all."""
  rows = _reference_rows(shared_dir)
  for i in (1, 4):
    rows[i] = {k: v for k, v in rows[i].items() if k not in ("thought", "all_thought", "model2scores")}
    rows[i]["query_id"] = f"missing-{i}"
  return rows


def _echo(asked):
  def complete(messages, body):
    query = messages[-1]["content"].rsplit("Query: ", 1)[1].split("\n")[0]
    asked.append(query)
    return f"perhaps {query} (sample {body['seed'] % 1000})"
  return complete


def _explore_args(path, out, server):
  return [f"--input={path}", f"--out={out}", "--num_shards=4", "--explore_missing", "--expert=http", "--model=echo",
          f"--base_url={server.base_url}", "--k=2", "--num_examples=1", "--members=bm25", "--max_attempts=1",
          "--concurrency=1", "--queries_per_batch=1", "--teacher=bge-reranker-v2"]


def test_explore_missing_fills_only_the_missing_thoughts(shared_dir, reference_run, tmp_path):
  rows = _missing_rows(shared_dir)
  path = _write_jsonl(tmp_path / "train.jsonl", rows)
  asked = []
  with ChatServer(_echo(asked)) as server:
    ingest.main(_explore_args(path, tmp_path / "out", server))
  assert sorted(asked) == sorted([rows[1]["query"]] * 2 + [rows[4]["query"]] * 2)
  records, kept = _records(tmp_path / "out"), _records(reference_run[2])
  for i, row in enumerate(rows):
    r = records[row.get("query_id", str(i + 1))]
    if i in (1, 4):
      assert len(r.thoughts) == 2 and all(t.startswith(f"perhaps {row['query']}") for t in r.thoughts)
      verdict = Committee([BM25Member()]).judge([row["pos"][0]], [list(r.thoughts)])[0]
      assert r.chosen == verdict.winner and r.vote == "soft" and r.committee_members == ("bm25",)
      np.testing.assert_allclose(r.committee_scores, verdict.scores)
    else:
      _assert_same_records({r.query_id: r}, {r.query_id: kept[r.query_id]})


def test_an_unavailable_expert_stops_resumably_and_the_rerun_loses_and_duplicates_nothing(shared_dir, tmp_path):
  rows = _missing_rows(shared_dir)
  path = _write_jsonl(tmp_path / "train.jsonl", rows)
  with ChatServer(_echo([])) as server:
    ingest.main(_explore_args(path, tmp_path / "uninterrupted", server))
  last = max(("missing-1", "missing-4"), key=lambda q: shard_layout.shard_of(q, 4))
  failing = next(r["query"] for r in rows if r.get("query_id") == last)

  def outage(messages, body):
    if failing in messages[-1]["content"].rsplit("Query: ", 1)[1]:
      raise ServerFault(503, "overloaded")
    return _echo([])(messages, body)

  out = tmp_path / "resumed"
  with ChatServer(outage) as server, pytest.raises(ExpertUnavailable, match="run the same command again"):
    ingest.main(_explore_args(path, out, server))
  before = {p.name: p.read_bytes() for p in out.glob("train-*.tfrecord")}
  assert len(before) == shard_layout.shard_of(last, 4) and not (out / "manifest.json").exists()
  with ChatServer(_echo([])) as server:
    result = ingest.main(_explore_args(path, out, server))
  assert len(result["shards_written"]) == 4 - len(before)
  after = {p.name: p.read_bytes() for p in out.glob("train-*.tfrecord")}
  assert {k: after[k] for k in before} == before
  assert after == {p.name: p.read_bytes() for p in (tmp_path / "uninterrupted").glob("train-*.tfrecord")}
  assert len(_records(out)) == 6 and not list(out.glob("*.tmp"))


def test_revote_rechooses_as_the_committee_would(reference_run, tmp_path):
  rows, path, out, _ = reference_run
  ingest.main([f"--input={path}", f"--out={tmp_path / 'out'}", "--num_shards=3", "--revote", "--members=bm25",
               "--teacher=bge-reranker-v2"])
  before, after = _records(out), _records(tmp_path / "out")
  committee = Committee([BM25Member()])
  changed = 0
  for query_id, r in after.items():
    assert r.thoughts == before[query_id].thoughts  # the same candidates, the data's thought among them
    verdict = committee.judge([r.positives[0]], [list(r.thoughts)])[0]
    assert r.chosen == verdict.winner and r.vote == "soft" and r.committee_members == ("bm25",)
    np.testing.assert_allclose(r.committee_scores, verdict.scores)
    np.testing.assert_allclose(r.vote_totals, verdict.totals)
    changed += r.chosen != before[query_id].chosen
    np.testing.assert_array_equal(r.positive_scores, before[query_id].positive_scores)
  assert changed >= 1


@pytest.mark.e2e
def test_an_ingested_file_with_teacher_scores_trains_with_distillation(shared_dir, smollm2_gguf, tmp_path):
  """Real DL21 records with teacher scores train SmolLM2-135M under the tiny recipe's lengths and batch. The layer
  loop stays rolled: tiny_cpu unrolls its 2 layers, and unrolling SmolLM2's 30 on 8 devices took 20 GB to compile."""
  from o1jax import train  # pylint: disable=g-import-not-at-top
  rows = []
  for i, g in enumerate(_groups(shared_dir, 16)):
    rows.append({"query_id": g["query_id"], "query": g["query"], "pos": g["pos"][:2], "neg": g["neg"][:3],
                 "thought": " ".join(g["pos"][0].split()[:12]), "pos_scores": [8.0, 6.5 + i % 2],
                 "neg_scores": [2.0, -1.0, 0.5 * (i % 3)]})
  path = _write_jsonl(tmp_path / "distill.jsonl", rows)
  ingest.main([f"--input={path}", f"--out={tmp_path / 'shards'}", "--num_shards=2", "--teacher=hand-written"])
  history = train.main([
      f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", "--config.model.source=gguf",
      f"--config.model.path={smollm2_gguf}", "--config.data.kind=tfrecord", "--config.model.unroll_layers=False",
      f"--config.data.train_files=('{tmp_path / 'shards' / 'manifest.json'}',)", "--config.train.w_distill=1.0",
      "--config.train.steps=2", "--config.log.every=1", "--config.log.tensorboard_dir=",
      f"--config.checkpoint.dir={tmp_path / 'ckpt'}", "--config.checkpoint.async_save=False"])
  assert [h["step"] for h in history] == [1, 2]
  assert all(math.isfinite(h["loss_distill"]) and h["loss_distill"] > 0 for h in history)
