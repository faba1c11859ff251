"""`python -m data_tools.subset`: a small BEIR directory cut from SciFact, read back as the recipe reads it."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_tools import subset
from o1jax.data.readers import load_beir

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_subset_keeps_the_first_queries_their_judged_documents_and_some_others(shared_dir, tmp_path):
  full = shared_dir / "data" / "beir-scifact"
  out = tmp_path / "small"
  summary = subset.main([f"--dataset={full}", f"--out={out}", "--queries=train:10", "--queries=test:4",
                         "--other_docs=30"])
  train, test = load_beir(full, "train"), load_beir(full, "test")
  small_train, small_test = load_beir(out, "train"), load_beir(out, "test")
  # The first judged queries of each split, with every judgement they had, and nothing else.
  assert small_train.qrels == {q: train.qrels[q] for q in list(train.qrels)[:10]}
  assert small_test.qrels == {q: test.qrels[q] for q in list(test.qrels)[:4]}
  assert small_test.queries == {q: test.queries[q] for q in small_test.qrels}
  # Every judged document, then the first 30 unjudged ones in corpus order, each with its title and text.
  judged = {d for qrels in (small_train.qrels, small_test.qrels) for grades in qrels.values() for d in grades}
  others = [d for d in test.corpus if d not in judged][:30]
  assert set(small_test.corpus) == judged | set(others) and len(small_test.corpus) == len(judged) + 30
  assert all(small_test.corpus[d] == test.corpus[d] for d in small_test.corpus)
  lines = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
  assert len(lines) == 14 and summary == {"documents": len(judged) + 30, "queries": 14}


def run(*argv):
  return subprocess.run([sys.executable, "-m", "data_tools.subset", *argv], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)


@pytest.mark.parametrize("extra,status,message", [
    (["--queries=test"], 2, "--queries: expected SPLIT:N with N >= 1 queries, got 'test'"),
    (["--queries=test:0"], 2, "--queries: expected SPLIT:N with N >= 1 queries, got 'test:0'"),
    (["--queries=test:2", "--queries=test:3"], 2, "--queries: a split is named twice (test, test)"),
    (["--queries=test:301"], 1, "python -m data_tools.subset: --queries=test:301: qrels/test.tsv judges only 300 queries"),
    (["--queries=dev:3"], 1, "python -m data_tools.subset: "),
])
def test_bad_input_is_one_line_and_writes_nothing(shared_dir, tmp_path, extra, status, message):
  out = tmp_path / "small"
  proc = run(f"--dataset={shared_dir / 'data' / 'beir-scifact'}", f"--out={out}", *extra)
  assert proc.returncode == status, proc.stderr
  assert message in proc.stderr.strip().splitlines()[-1]
  assert len(proc.stderr.strip().splitlines()) == 1 or "usage:" in proc.stderr  # argparse prints its usage first
  assert not out.exists()


def test_an_existing_directory_is_not_overwritten(shared_dir, tmp_path):
  out = tmp_path / "small"
  out.mkdir()
  (out / "corpus.jsonl").write_text("mine\n")
  proc = run(f"--dataset={shared_dir / 'data' / 'beir-scifact'}", f"--out={out}", "--queries=test:2")
  assert proc.returncode == 2 and "already exists (nothing is overwritten)" in proc.stderr
  assert (out / "corpus.jsonl").read_text() == "mine\n"
