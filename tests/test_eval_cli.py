"""`python -m o1jax.eval` end to end on a SciFact subset (32 test queries, their judged docs and 300 others) with a
tiny random model on the SmolLM2 tokenizer: o1jax think / no-think, BM25 and MiniLM in one table; metrics equal
pytrec_eval on the written run files; the Retriever API reproduces the CLI's runs and numbers exactly; bad input
is named. Evaluation during training: eval metrics logged at every N steps equal a Retriever on the checkpoint.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import pytrec_eval

from o1jax import train
from o1jax.data import synthetic
from o1jax.data.readers import load_beir
from o1jax.eval import metrics, retriever_eval
from o1jax.eval.__main__ import main
from o1jax.eval.run_file import cut_run, read_run
from o1jax.retrieval.retriever import Retriever, Sampling
from o1jax.templates import document_text
from o1jax.tokenizer import load_tokenizer
from test_retriever import tiny_model_dir  # pylint: disable=wrong-import-order  (tests/ is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_beir(directory, corpus, queries, qrels):
  """corpus: {id: (title, text)}, queries: {id: text}, qrels: {qid: {doc id: grade}} as a BEIR directory."""
  (directory / "qrels").mkdir(parents=True)
  with open(directory / "corpus.jsonl", "w") as f:
    for doc_id, (title, text) in corpus.items():
      f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
  with open(directory / "queries.jsonl", "w") as f:
    for qid, text in queries.items():
      f.write(json.dumps({"_id": qid, "text": text}) + "\n")
  lines = [f"{q}\t{d}\t{g}" for q, docs in qrels.items() for d, g in docs.items()]
  (directory / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
  return directory


def write_scifact_subset(shared_dir, directory, num_queries):
  """The first `num_queries` SciFact test queries with a corpus of their judged docs and 300 others."""
  full = retriever_eval.first_queries(load_beir(shared_dir / "data" / "beir-scifact", "test"), num_queries)
  judged = {d for docs in full.qrels.values() for d in docs}
  others = [d for d in full.corpus if d not in judged][:300]
  corpus = {d: (full.corpus[d].title, full.corpus[d].text) for d in [*sorted(judged), *others]}
  return write_beir(directory, corpus, full.queries, full.qrels)


@pytest.fixture(scope="module")
def scifact_subset(shared_dir, tmp_path_factory):
  return write_scifact_subset(shared_dir, tmp_path_factory.mktemp("scifact") / "subset", 32)


@pytest.fixture(scope="module")
def model_dir(smollm2_gguf, tmp_path_factory):
  return tiny_model_dir(load_tokenizer(smollm2_gguf), tmp_path_factory.mktemp("tiny") / "hf", seed=1)


@pytest.fixture(scope="module")
def cli_run(scifact_subset, model_dir, tmp_path_factory):
  out, cache = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("cache")
  results = main([f"--checkpoint={model_dir}", f"--dataset={scifact_subset}", "--think=2", "--max_new_tokens=8",
                  "--search=exact", f"--out={out}", f"--cache_dir={cache}", "--seed=5"])
  assert list(results) == ["subset"]  # one dataset, named by its directory
  return results["subset"], out, cache


def test_one_table_with_think_no_think_and_baselines(cli_run, capsys):
  results, out, _ = cli_run
  assert list(results) == ["o1jax think=2", "o1jax no-think", "BM25", "MiniLM-L6-v2"]
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["metrics"]) == set(results) and summary["datasets"]["subset"]["suite"] == "beir"
  assert sorted(p.name for p in out.glob("*.thoughts.jsonl")) == ["o1jax_think_2.thoughts.jsonl"]
  for evaluation in results.values():
    assert set(evaluation.metrics) == {"ndcg@10", "mrr@10", "recall@100", "recall@1000"}
    assert len(evaluation.per_query["ndcg@10"]) == 32
  # On 32 queries over 340 docs, the real baselines retrieve; recall@1000 covers the whole corpus.
  assert results["BM25"].metrics["ndcg@10"] > 0.5 and results["MiniLM-L6-v2"].metrics["ndcg@10"] > 0.5
  assert results["o1jax no-think"].metrics["recall@1000"] == 1.0


@pytest.mark.parametrize("name", ["o1jax_think_2", "o1jax_no-think", "BM25", "MiniLM-L6-v2"])
def test_metrics_json_equals_pytrec_eval_on_the_run_file(cli_run, scifact_subset, name):
  _, out, _ = cli_run
  dataset = load_beir(scifact_subset, "test")
  qrels = dataset.qrels
  run = read_run(out / f"{name}.trec")
  assert all(len(docs) == len(dataset.corpus) for docs in run.values())  # top 1000 of a ~340-doc corpus
  scored = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100,1000"}).evaluate(run)
  mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut_run(run, 10))
  expected = {"ndcg@10": np.mean([scored[q]["ndcg_cut_10"] for q in qrels]),
              "recall@100": np.mean([scored[q]["recall_100"] for q in qrels]),
              "recall@1000": np.mean([scored[q]["recall_1000"] for q in qrels]),
              "mrr@10": np.mean([mrr[q]["recip_rank"] for q in qrels])}
  written = json.loads((out / f"{name}.metrics.json").read_text())["metrics"]
  assert written == pytest.approx(expected, abs=1e-12)


def test_api_reproduces_the_cli_exactly(cli_run, scifact_subset, model_dir):
  results, out, cache = cli_run
  dataset = load_beir(scifact_subset, "test")
  retriever = Retriever.from_pretrained(model_dir)
  doc_ids = list(dataset.corpus)
  retriever.index(doc_ids, [document_text(dataset.corpus[d].title, dataset.corpus[d].text) for d in doc_ids],
                  backend="exact", cache_dir=cache)
  query_ids = list(dataset.queries)
  for think, name in [(2, "o1jax think=2"), (0, "o1jax no-think")]:
    hits = retriever.search([dataset.queries[q] for q in query_ids], k=1000, think=think,
                            sampling=Sampling(max_new_tokens=8), rng=5)
    run = {q: dict(h) for q, h in zip(query_ids, hits)}
    assert run == results[name].run == read_run(out / f"{name.replace(' ', '_').replace('=', '_')}.trec")
    assert metrics.evaluate(dataset.qrels, run) == results[name].metrics


def test_max_queries_think_off_and_self_hits(cli_run, scifact_subset, model_dir, capsys):
  _, _, cache = cli_run
  results = main([f"--checkpoint={model_dir}", f"--dataset={scifact_subset}", "--think=off", "--baselines=bm25",
                  "--max_queries=5", "--search=exact", f"--cache_dir={cache}", "--drop_self_hits",
                  "--per_query"])["subset"]
  assert list(results) == ["o1jax no-think", "BM25"]
  assert all(len(r.run) == 5 and len(r.per_query["mrr@10"]) == 5 for r in results.values())
  printed = capsys.readouterr().out
  assert "o1jax no-think" in printed and printed.count("\nBM25\t") == 5


def test_the_cli_on_a_cpu_runs_under_mimalloc_with_the_same_results(tmp_path, scifact_subset, model_dir):
  args = [f"--checkpoint={model_dir}", f"--dataset={scifact_subset}", "--think=off", "--baselines=",
          "--max_queries=8", "--search=exact"]
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "O1JAX_HOST_ALLOCATOR")}
  proc = subprocess.run([sys.executable, "-m", "o1jax.eval", *args, f"--out={tmp_path / 'cli'}"], cwd=ROOT,
                        env=dict(env, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  main([*args, f"--out={tmp_path / 'here'}"])
  cli, here = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("cli", "here"))
  assert cli["host_allocator"] == "mimalloc" and here["host_allocator"] == "system"
  assert cli["metrics"] == here["metrics"]


def test_bad_input_is_named(tmp_path, model_dir):
  corpus = {"d1": ("", "vitamin C"), "d2": ("Colds", "zinc")}
  missing = write_beir(tmp_path / "missing", corpus, {"q1": "scurvy"}, {"q1": {"d1": 1, "d9": 1}})
  proc = subprocess.run([sys.executable, "-m", "o1jax.eval", f"--checkpoint={model_dir}", f"--dataset={missing}"],
                        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1
  assert "qrels/test.tsv, line 3, field 'corpus-id': doc 'd9' is not in" in proc.stderr
  empty = write_beir(tmp_path / "empty", {}, {"q1": "scurvy"}, {"q1": {"d1": 1}})
  with pytest.raises(ValueError, match="corpus.jsonl, line 1, field '_id': empty corpus"):
    main([f"--checkpoint={model_dir}", f"--dataset={empty}"])
  blank = write_beir(tmp_path / "blank", corpus, {"q1": "scurvy", "q2": " "}, {"q1": {"d1": 1}})
  with pytest.raises(ValueError, match="queries.jsonl, line 2, field 'text'"):
    main([f"--checkpoint={model_dir}", f"--dataset={blank}"])
  with pytest.raises(SystemExit):
    main([f"--checkpoint={model_dir}", f"--dataset={blank}", "--think=some"])
  with pytest.raises(ValueError, match=r"--doc_tokens=2: must be >= 3"):
    main([f"--checkpoint={model_dir}", f"--dataset={blank}", "--doc_tokens=2"])


def test_evaluation_during_training_is_logged_and_matches_the_checkpoint(tmp_path):
  records = synthetic.make_records(synthetic.SyntheticSpec())
  docs = {}
  for r in records:
    for text in r["positives"] + r["negatives"]:
      docs.setdefault(text, f"d{len(docs)}")
  dev = write_beir(tmp_path / "dev", {i: ("", t) for t, i in docs.items()}, {r["query_id"]: r["query"] for r in records},
                   {r["query_id"]: {docs[r["positives"][0]]: 1} for r in records})
  ckpt = tmp_path / "ckpt"
  history = train.main([f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", "--config.train.steps=6", "--config.log.every=3",
                        "--config.log.tensorboard_dir=", f"--config.checkpoint.dir={ckpt}", "--config.eval.every=3",
                        f"--config.eval.dataset={dev}", "--config.eval.max_queries=48", "--config.eval.think=2",
                        "--config.eval.max_new_tokens=4"])
  logged = {int(h["step"]): {k[5:]: v for k, v in h.items() if k.startswith("eval/")} for h in history}
  assert sorted(logged) == [3, 6] and all(set(m) == set(metrics.DEFAULT_MEASURES) for m in logged.values())
  assert logged[3] != logged[6]
  retriever = Retriever.from_pretrained(ckpt)
  dataset = retriever_eval.first_queries(load_beir(dev, "test"), 48)
  retriever_eval.index_corpus(retriever, dataset, backend="exact", cache_dir=tmp_path / "cache")
  evaluation = retriever_eval.evaluate(retriever, dataset, 2, sampling=Sampling(max_new_tokens=4), rng=0)
  assert evaluation.metrics == pytest.approx(logged[6], abs=1e-6)
  with pytest.raises(train.o1config.ConfigError, match="config.eval.every=2: must be 0 .off. or a positive multiple"):
    train.main([f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", "--config.log.every=3", "--config.eval.every=2",
                f"--config.eval.dataset={dev}"])
