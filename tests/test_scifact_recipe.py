"""The SciFact recipe (`launch/scifact.sh`, README "Results"): the script runs every stage for real on a SciFact
subset with SmolLM2-135M and reports one table; a second run skips finished stages; the committed results are what
the report renders, and the README shows them; the report names bad input.
"""
import json
import pathlib
import shutil
import subprocess

import pytest

from launch import report
from o1jax import config as o1config
from o1jax.data.readers import load_beir
from test_launch import clean_env  # pylint: disable=wrong-import-order  (tests/ is on sys.path)

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "launch" / "results" / "scifact"
ROWS = ["trained, think=3", "trained, no thinking", "untrained, no thinking", "BM25", "MiniLM-L6-v2"]


def write_subset(full, directory: pathlib.Path, train_ids, test_ids, other_docs: int) -> pathlib.Path:
  """A BEIR directory with the given train and test queries of SciFact, their judged docs and some others."""
  train, test = load_beir(full, "train"), load_beir(full, "test")
  qrels = {"train": {q: train.qrels[q] for q in train_ids}, "test": {q: test.qrels[q] for q in test_ids}}
  judged = sorted({d for split in qrels.values() for docs in split.values() for d in docs})
  docs = judged + [d for d in test.corpus if d not in judged][:other_docs]
  (directory / "qrels").mkdir(parents=True)
  with open(directory / "corpus.jsonl", "w") as f:
    for d in docs:
      f.write(json.dumps({"_id": d, "title": test.corpus[d].title, "text": test.corpus[d].text}) + "\n")
  queries = {**{q: train.queries[q] for q in train_ids}, **{q: test.queries[q] for q in test_ids}}
  with open(directory / "queries.jsonl", "w") as f:
    for q, text in queries.items():
      f.write(json.dumps({"_id": q, "text": text}) + "\n")
  for split, judgements in qrels.items():
    lines = [f"{q}\t{d}\t{g}" for q, ds in judgements.items() for d, g in ds.items()]
    (directory / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
  return directory


def recipe(shared_dir, out, dataset, *extra) -> subprocess.CompletedProcess:
  return subprocess.run(
      ["bash", "launch/scifact.sh", f"--shared={shared_dir}", f"--out={out}", f"--dataset={dataset}", "--limit=8",
       "--shards=1", "--steps=2", "--max_queries=4", "--", "--config.train.batch_queries=4", *extra],
      cwd=ROOT, env=clean_env(O1JAX_CACHE=str(out / "cache")), capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def quick_run(shared_dir, tmp_path_factory):
  full = shared_dir / "data" / "beir-scifact"
  train_ids = list(load_beir(full, "train").queries)[:10]
  test_ids = list(load_beir(full, "test").queries)[:4]
  dataset = write_subset(full, tmp_path_factory.mktemp("data") / "scifact", train_ids, test_ids, other_docs=30)
  out = tmp_path_factory.mktemp("run")
  proc = recipe(shared_dir, out, dataset)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, dataset, proc


def test_every_stage_runs_and_the_report_is_one_table(quick_run):
  out, _, proc = quick_run
  assert sorted(p.stem for p in (out / "stages").glob("*.seconds")) == sorted(report.STAGE_ORDER)
  manifest = json.loads((out / "thoughts" / "manifest.json").read_text())
  assert manifest["num_records"] == 8 and manifest["config"]["members"] == "bm25,st"
  results = report.collect(out)
  assert list(results.rows) == ROWS
  assert [s["step"] for s in results.steps] == [1, 2]
  markdown = (out / "results.md").read_text()
  assert markdown == report.render_markdown(results) and markdown in proc.stdout
  # The table's numbers are those the evaluation CLI wrote.
  trained = json.loads((out / "eval" / "trained" / "summary.json").read_text())["metrics"]
  assert f"| trained, think=3 | {trained['o1jax think=3']['ndcg@10']:.4f} |" in markdown
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_skips_finished_stages_and_retraining_reproduces_the_table(quick_run, shared_dir):
  out, dataset, _ = quick_run
  before = report.collect(out)
  for stage in ("train", "trained"):
    (out / "stages" / f"{stage}.seconds").unlink()
  shutil.rmtree(out / "train")
  shutil.rmtree(out / "eval" / "trained")
  (out / "train_metrics.jsonl").unlink()
  proc = recipe(shared_dir, out, dataset)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stderr.count("done in an earlier run") == 3  # thoughts, convert, untrained
  after = report.collect(out)
  assert after.rows == before.rows  # same config and seed: the same metrics, to the last digit
  assert [s["loss"] for s in after.steps] == [s["loss"] for s in before.steps]


def test_missing_shared_data_is_named(tmp_path):
  proc = subprocess.run(["bash", "launch/scifact.sh", f"--shared={tmp_path}", f"--out={tmp_path / 'run'}"],
                        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert f"{tmp_path}/data/beir-scifact/qrels/train.tsv not found" in proc.stderr


def test_config_validates_with_the_shared_model(smollm2_gguf, tmp_path):
  shard = tmp_path / "train-00000-of-00001.tfrecord"
  shard.write_bytes(b"")
  config = o1config.load(["--config=configs/smollm2_135m_scifact.py", f"--config.model.path={smollm2_gguf}",
                          f"--config.data.train_files=('{tmp_path}/train-*.tfrecord',)"])
  assert o1config.validate(config, device_count=1) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert (config.train.lengths.doc, config.train.finetune) == (64, "full")


def test_committed_results_are_the_reports_rendering_and_in_the_readme():
  results = report.collect(RESULTS)
  assert list(results.rows) == ROWS and results.ours == ROWS[:3]
  assert sorted(results.stage_seconds) == sorted(report.STAGE_ORDER)
  markdown = report.render_markdown(results)
  assert (RESULTS / "results.md").read_text() == markdown
  assert markdown in (ROOT / "README.md").read_text()
  assert (RESULTS / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError, match="no evaluation results"):
    report.collect(tmp_path)
  (tmp_path / "eval" / "a").mkdir(parents=True)
  (tmp_path / "eval" / "a" / "summary.json").write_text(json.dumps({"metrics": {"BM25": {"ndcg@10": 0.5}}}))
  (tmp_path / "train_metrics.jsonl").write_text('{"step": 1, "loss_ctr": 1.0}\n{"step": 2,\n')
  with pytest.raises(ValueError, match=r"train_metrics.jsonl:2: not a JSON line"):
    report.collect(tmp_path)
  (tmp_path / "eval" / "a" / "summary.json").write_text("{}")
  with pytest.raises(ValueError, match=r"eval/a/summary.json: not a summary.json"):
    report.collect(tmp_path)
