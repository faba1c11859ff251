"""mteb runs an o1jax model: on a SciFact subset (20 test queries, their judged docs and 300 others) read by mteb's
own `datasets` (no download), `mteb.evaluate` with the o1jax encoder gets the nDCG@10, Recall@100 and every
query's top 10 that `python -m o1jax.eval` gets on the same BEIR directory, with one sampled thought per query and
without thinking. `python -m o1jax.eval.mteb` on the directory gets them too; its bad input is one line.
"""
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import mteb  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
import pytest  # noqa: E402

from o1jax.eval.__main__ import main  # noqa: E402
from o1jax.eval.mteb.__main__ import main as mteb_main  # noqa: E402
from o1jax.eval.mteb_encoder import O1jaxEncoder  # noqa: E402
from o1jax.generate import Sampling  # noqa: E402
from o1jax.tokenizer import load_tokenizer  # noqa: E402
from test_eval_cli import write_beir, write_scifact_subset  # noqa: E402  (tests/ is on sys.path)
from test_retriever import tiny_model_dir  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED, THOUGHT_TOKENS, DOC_TOKENS = 3, 8, 128


def beir_task(directory, cache_dir):
  """An mteb retrieval task over a local BEIR directory, read with `datasets` (json and tsv), not o1jax."""

  class LocalBeir(AbsTaskRetrieval):
    metadata = TaskMetadata(
        name="LocalSciFactSubset", description="A SciFact test subset from local BEIR files.", type="Retrieval",
        reference="https://github.com/beir-cellar/beir", dataset={"path": str(directory), "revision": "local"},
        category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
        date=("2020-01-01", "2020-12-31"), domains=["Academic"], task_subtypes=[], license="cc-by-4.0",
        annotations_creators="expert-annotated", dialect=[], sample_creation="found", bibtex_citation="")

    def load_data(self, num_proc=None, **kwargs):
      def load(kind, path, **options):
        return datasets.load_dataset(kind, data_files=str(directory / path), split="train", cache_dir=str(cache_dir),
                                     **options)
      corpus = load("json", "corpus.jsonl").rename_column("_id", "id")
      queries = load("json", "queries.jsonl").rename_column("_id", "id")
      qrels = {}
      columns = datasets.Features({c: datasets.Value("string") for c in ("query-id", "corpus-id", "score")})
      for row in load("csv", "qrels/test.tsv", delimiter="\t", features=columns):
        qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
      self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": qrels,
                                           "top_ranked": None}}}
      self.data_loaded = True

  return LocalBeir()


def top(docs, k=10):
  return sorted(docs.items(), key=lambda item: item[1], reverse=True)[:k]


@pytest.fixture(scope="module")
def scifact_subset(shared_dir, tmp_path_factory):
  return write_scifact_subset(shared_dir, tmp_path_factory.mktemp("scifact") / "subset", 20)


@pytest.fixture(scope="module")
def model_dir(smollm2_gguf, tmp_path_factory):
  return tiny_model_dir(load_tokenizer(smollm2_gguf), tmp_path_factory.mktemp("tiny") / "hf", seed=1)


@pytest.fixture(scope="module")
def embedding_cache(tmp_path_factory):
  """Shared by both sides: its key holds every document's text, so mteb reuses o1jax's document vectors only where
  it feeds the encoder the same texts (METHOD §2's `title text`, stripped)."""
  return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def o1jax_eval(scifact_subset, model_dir, embedding_cache):
  """`python -m o1jax.eval` in-process: one thought per query and no thinking, {label: Evaluation}."""
  results = main([f"--checkpoint={model_dir}", f"--dataset={scifact_subset}", "--baselines=", "--think=1",
                  f"--seed={SEED}", f"--max_new_tokens={THOUGHT_TOKENS}", f"--doc_tokens={DOC_TOKENS}",
                  "--search=exact", f"--cache_dir={embedding_cache}"])
  (systems,) = results.values()  # {dataset: {system: Evaluation}}: one dataset
  return systems


@pytest.mark.parametrize("think,label", [(0, "o1jax no-think"), (1, "o1jax think=1")])
def test_mteb_gets_the_ndcg_of_o1jax_eval(scifact_subset, model_dir, o1jax_eval, embedding_cache, tmp_path, think,
                                         label):
  encoder = O1jaxEncoder.from_pretrained(model_dir, think=think, seed=SEED, doc_tokens=DOC_TOKENS,
                                         sampling=Sampling(max_new_tokens=THOUGHT_TOKENS), cache_dir=embedding_cache)
  task = beir_task(scifact_subset, tmp_path / "hf")
  result = mteb.evaluate(encoder, task, cache=None, co2_tracker=False, encode_kwargs={"batch_size": 7},
                         prediction_folder=tmp_path, show_progress_bar=False)
  (task_result,) = result.task_results
  (scores,) = task_result.scores["test"]
  expected = o1jax_eval[label]
  assert scores["ndcg_at_10"] == pytest.approx(expected.metrics["ndcg@10"], abs=1e-4)
  assert scores["recall_at_100"] == pytest.approx(expected.metrics["recall@100"], abs=1e-4)
  # Not by chance: every query's top 10 are the same documents in the same order with the same scores.
  run = json.loads((tmp_path / task.prediction_file_name).read_text())["default"]["test"]
  assert run.keys() == expected.run.keys()
  for qid, docs in run.items():
    mteb_top, o1jax_top = top(docs), top(expected.run[qid])
    assert [d for d, _ in mteb_top] == [d for d, _ in o1jax_top], qid
    assert [s for _, s in mteb_top] == pytest.approx([s for _, s in o1jax_top], abs=1e-5)


def test_cli_on_a_local_dataset(scifact_subset, model_dir, o1jax_eval, embedding_cache, tmp_path, capsys):
  scores = mteb_main([f"--checkpoint={model_dir}", f"--dataset={scifact_subset}", f"--doc_tokens={DOC_TOKENS}",
                      f"--cache_dir={embedding_cache}", f"--out={tmp_path}"])
  (subset,) = scores["subset"]["test"]
  assert subset["ndcg_at_10"] == pytest.approx(o1jax_eval["o1jax no-think"].metrics["ndcg@10"], abs=1e-4)
  assert f"{subset['ndcg_at_10']:.4f}" in capsys.readouterr().out.splitlines()[-1]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["scores"]["subset"]["test"][0]["main_score"] == subset["main_score"]
  assert summary["model"]["experiment"] == {"think": 0, "doc_tokens": DOC_TOKENS, "dtype": "float32"}


def test_bad_input_is_one_line(scifact_subset, model_dir, tmp_path):
  with pytest.raises(ValueError, match=r"--tasks=SciFakt: 'SciFakt' not found. Did you mean: 'SciFact'"):
    mteb_main([f"--checkpoint={model_dir}", "--tasks=SciFakt"])
  with pytest.raises(ValueError, match=r"--tasks, --dataset: no task"):
    mteb_main([f"--checkpoint={model_dir}"])
  with pytest.raises(ValueError, match=r"--top_p=2.0: must be in"):
    mteb_main([f"--checkpoint={model_dir}", f"--dataset={scifact_subset}", "--think=1", "--top_p=2"])
  blank = write_beir(tmp_path / "blank", {"d1": ("", "vitamin C")}, {"q1": "scurvy", "q2": " "}, {"q1": {"d1": 1}})
  with pytest.raises(ValueError, match=r"queries.jsonl, line 2, field 'text'"):
    mteb_main([f"--checkpoint={model_dir}", f"--dataset={blank}"])
  with pytest.raises(SystemExit):
    mteb_main([f"--checkpoint={model_dir}", f"--dataset={scifact_subset}", "--think=some"])
  # An mteb task whose data cannot be downloaded (offline here) stops the command before the model loads.
  proc = subprocess.run([sys.executable, "-m", "o1jax.eval.mteb", f"--checkpoint={model_dir}", "--tasks=SciFact"],
                        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
                                           HF_DATASETS_OFFLINE="1"), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --tasks: SciFact: its data cannot be loaded (Couldn't reach 'mteb/scifact' on the Hub "
      "(OfflineModeIsEnabled))")
