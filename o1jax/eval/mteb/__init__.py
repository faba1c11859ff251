"""mteb on o1jax models: a BEIR split as an mteb retrieval task (`local_task`), and `python -m o1jax.eval.mteb`.

The encoder mteb runs is `o1jax.eval.mteb_encoder.O1jaxEncoder`. A local task is what `python -m o1jax.eval`
evaluates (the split's judged queries, the whole corpus, the qrels), handed to mteb in memory: nothing is
downloaded, and mteb joins each document's title and text as o1jax does.
"""
from __future__ import annotations

from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata

from o1jax.data.readers import BeirDataset


def local_task(name: str, dataset: BeirDataset, split: str = "test") -> AbsTaskRetrieval:
  """`dataset` as an mteb retrieval task named `name`, its data loaded as the split `split`; nDCG@10 is its main
  score, as in mteb's own BEIR tasks."""
  metadata = TaskMetadata(
      name=name, description=f"{name}: local BEIR files read by o1jax.", type="Retrieval", reference=None,
      dataset={"path": name, "revision": "local"}, category="t2t", modalities=["text"], eval_splits=[split],
      eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
      annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)
  corpus = Dataset.from_list([{"id": d, "title": doc.title, "text": doc.text} for d, doc in dataset.corpus.items()])
  queries = Dataset.from_list([{"id": q, "text": text} for q, text in dataset.queries.items()])

  class LocalTask(AbsTaskRetrieval):

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
      self.dataset = {"default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": dataset.qrels,
                                          "top_ranked": None}}}
      self.data_loaded = True

  LocalTask.metadata = metadata
  return LocalTask()
