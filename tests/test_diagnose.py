"""`python -m data_tools.diagnose` (issue 17.2): the words it compares, its quality figures against a count by hand
and sentence-transformers' own cosine, and its bad input named in one line before the expert loads. The whole tool
runs for real with the SmolLM2 expert in the recipe test (tests/test_recipe.py)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from data_tools.committee import sentence_transformer_member
from data_tools.diagnose import Query, quality, words
from o1jax.retrieval.sentence_encoder import offline_minilm_path
from test_eval_cli import write_beir  # pylint: disable=wrong-import-order  (tests/ is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_words_are_lowercased_identifiers_without_stopwords():
  assert words("The read_csv() call in Pandas, and os.path.join2 of 3 files") == {
      "read_csv", "call", "pandas", "os", "path", "join2", "files"}


def test_quality_counts_words_by_hand_and_takes_minilms_cosine():
  queries = [Query("q1", "vitamin C deficiency", ("Scurvy is caused by a lack of vitamin C in the diet.",
                                                  "Citrus fruit prevents scurvy.")),
             Query("q2", "sorting a list in python", ("def sort_items(items): return sorted(items)",))]
  thoughts = [["Scurvy follows a diet poor in vitamin C.", ""], ["Use sorted() on the items list."]]
  measured = quality(queries, thoughts, sentence_transformer_member())
  # q1: {scurvy, follows, diet, poor, vitamin, c}; in a relevant doc: scurvy, diet, vitamin, c (4 of 6), of which
  # scurvy and diet are not in the query; the empty thought has no words and no cosine.
  # q2: {use, sorted, items, list}; in the relevant doc: sorted, items (2 of 4), neither in the query.
  share = np.mean([4 / 6, 2 / 4])
  model = SentenceTransformer(offline_minilm_path(), device="cpu")
  vectors = model.encode([queries[0].relevant[0], thoughts[0][0], queries[1].relevant[0], thoughts[1][0]],
                         normalize_embeddings=True)
  cosine = np.mean([vectors[0] @ vectors[1], vectors[2] @ vectors[3]])
  assert measured.thoughts_per_query == 1.5
  assert measured.words == pytest.approx(np.mean([6 / 2, 4]))  # q1's mean over its two thoughts: (6 + 0) / 2
  assert measured.share_in_relevant == pytest.approx(share)
  assert measured.new_relevant_words == pytest.approx(np.mean([2 / 2, 2]))
  assert measured.minilm_cosine == pytest.approx(cosine, abs=1e-5)


@pytest.fixture
def dataset(tmp_path):
  directory = write_beir(tmp_path / "d", {"d1": ("", "text one"), "d2": ("", "text two")},
                         {"q1": "query one", "q2": "query two", "t1": "train query"},
                         {"q1": {"d1": 1}, "q2": {"d2": 1}})
  (directory / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nt1\td1\t1\n")
  return directory


def run(*argv):
  return subprocess.run([sys.executable, "-m", "data_tools.diagnose", *argv], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)


@pytest.mark.parametrize("extra,status,message", [
    (["--num_examples=2"], 2, "--num_examples=2 needs --example_split (the split to draw examples from)"),
    (["--num_examples=2", "--example_split=test"], 2,
     "--example_split=test: the evaluated split; examples would show its labels"),
    (["--num_examples=2", "--example_split=dev"], 1, "qrels: neither dev.tsv nor dev.tsv.gz exists"),
    (["--num_examples=2", "--example_split=train"], 1,
     "--num_examples=2: need more than 2 training pairs to draw in-context examples from, got 1"),
    (["--members=bm25"], 2, "--members=bm25: the MiniLM cosine needs the st member"),
    (["--score=oracle={file}"], 2, "--score=oracle={file}: the name 'oracle' is taken (query, expert, "),
    (["--score=t={missing}"], 2, "no such file"),
    (["--score=t={file}"], 1, "python -m data_tools.diagnose: --score=t={file}: no thoughts for 1 of the 2 queries "
                              "(first: 'q2')"),
    (["--score=t={bad}"], 1, "bad.jsonl, line 1, field 'thoughts': expected a non-empty list of strings"),
    (["--candidates_from={missing}"], 2, "--candidates_from={missing}: no such file"),
    (["--candidates_from={file}"], 1, "--candidates_from={file}: no thoughts for 1 of the 2 queries (first: 'q2')"),
])
def test_bad_input_is_one_line_before_the_expert_loads(dataset, tmp_path, extra, status, message):
  """The expert's model file does not exist: every failure here comes before anything loads it."""
  (tmp_path / "t.jsonl").write_text(json.dumps({"query_id": "q1", "thoughts": ["a thought"]}) + "\n")
  (tmp_path / "bad.jsonl").write_text(json.dumps({"query_id": "q1", "thoughts": "a thought"}) + "\n")
  names = {"file": tmp_path / "t.jsonl", "missing": tmp_path / "none.jsonl", "bad": tmp_path / "bad.jsonl"}
  proc = run(f"--dataset={dataset}", f"--out={tmp_path / 'out'}", f"--model={tmp_path / 'none.gguf'}",
             *(e.format(**names) for e in extra))
  assert proc.returncode == status, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert message.format(**names) in lines[-1], proc.stderr
  assert len(lines) == 1 or lines[-1].startswith("python -m data_tools.diagnose: error: "), proc.stderr  # argparse
  assert not (tmp_path / "out").exists()


def test_earlier_candidates_stand_in_for_the_expert(dataset, tmp_path):
  """With --candidates_from the expert never runs (its model file does not exist here): the committee judges the
  earlier candidates, the written thoughts and figures come from them, and the run writes them again for the next."""
  earlier = tmp_path / "candidates.thoughts.jsonl"
  given = {"q1": ["nothing alike", "text one"], "q2": ["text two", "unrelated words"]}
  queries = {"q1": "query one", "q2": "query two"}
  earlier.write_text("".join(json.dumps({"query_id": q, "query": queries[q], "thoughts": t}) + "\n"
                             for q, t in given.items()))
  out = tmp_path / "out"
  proc = run(f"--dataset={dataset}", f"--out={out}", f"--model={tmp_path / 'none.gguf'}",
             f"--candidates_from={earlier}", "--k=2")
  assert proc.returncode == 0, proc.stderr
  read = lambda name: {r["query_id"]: r["thoughts"] for r in map(json.loads, (out / name).read_text().splitlines())}
  assert read("expert.thoughts.jsonl") == {"q1": ["nothing alike"], "q2": ["text two"]}
  # The committee compared each candidate with the relevant document ("text one", "text two").
  assert read("expert-chosen.thoughts.jsonl") == {"q1": ["text one"], "q2": ["text two"]}
  assert read("candidates.thoughts.jsonl") == given
  quality_json = json.loads((out / "quality.json").read_text())
  assert quality_json["candidates_from"] == str(earlier) and quality_json["sources"]["expert-random"][
      "thoughts_per_query"] == 2.0
