"""Dense hard-negative mining: a dense model retrieves each training query's top hits from a corpus and the
query's negatives are sampled from a rank range of them.

  python -m data_tools.mine --input=thoughts/scifact/manifest.json --corpus=$O1JAX_SHARED/data/beir-scifact \
      --model=minilm --out=thoughts/scifact-mined --range=10:100 --num_negatives=15 [--search=auto|exact|scann]

`--model`: an o1jax checkpoint or exported directory (queries embedded without thinking), a sentence-transformers
directory, or `minilm` (see `data_tools.dense`). `--corpus`: a BEIR directory (its corpus.jsonl[.gz]) or a corpus
file (BEIR jsonl or MS MARCO tsv, `.gz` or not); documents are `title text`.

Rule (FlagEmbedding's hn_mine): each query retrieves the top `end` documents of `--range=start:end`; the
candidates are ranks [start, end) of that list (0-based: 10:100 skips the 10 best hits, which are likely
unlabelled positives), without the query's positives (by corpus id when the record has positive_ids, else by
exact passage text). `--num_negatives` of them are drawn without replacement, the same for a given `--seed` and
query id, and kept in rank order. A query with fewer candidates keeps them all (training cycles through a short
list); a query with none is a bad query: the run stops naming it, or `--skip_bad` leaves it out and lists it in
the manifest. The corpus must hold more than `start` documents.

Records keep their query id, query, thoughts and committee fields; negatives and negative_ids are replaced, the
teacher scores (which belonged to the old negatives) are dropped -- add new ones with `python -m data_tools.score`
-- and `miner` names the model, search, range, count and seed. Output, workers and restarts: `data_tools.dense`.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import pathlib
import sys
from typing import Any

import numpy as np

from data_tools import dense
from data_tools import shards
from data_tools.inputs import stable_hash
from data_tools.record import ThoughtRecord
from o1jax.data import readers
from o1jax.templates import document_text

PROG = "python -m data_tools.mine"
def parse_range(value: str) -> tuple[int, int]:
  try:
    start, end = (int(part) for part in value.split(":"))
  except ValueError:
    raise ValueError(f"--range={value}: expected START:END, e.g. 10:100") from None
  if not 0 <= start < end:
    raise ValueError(f"--range={value}: need 0 <= START < END")
  return start, end


def corpus_file(value: str) -> pathlib.Path:
  path = pathlib.Path(value)
  if path.is_dir():
    try:
      return readers.find_file(path, "corpus.jsonl")
    except FileNotFoundError as e:
      raise ValueError(f"--corpus={value}: {e}") from None
  if not path.is_file():
    raise ValueError(f"--corpus={value}: no such file or directory")
  return path


def check_args(argv: Sequence[str]) -> dense.Job:
  p = dense.parser(PROG, __doc__.split("\n\n")[0])
  p.add_argument("--corpus", required=True, help="BEIR directory, or corpus jsonl / tsv file")
  p.add_argument("--range", default="10:100", help="START:END: sample from ranks [START, END), 0-based")
  p.add_argument("--num_negatives", type=int, default=15)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--search", choices=("auto", "exact", "scann"), default="auto",
                 help="auto: ScaNN where installed, else exact")
  p.add_argument("--cache_dir", default=None, help="corpus embedding cache (default $O1JAX_CACHE or ~/.cache/o1jax)")
  args = p.parse_args(argv)
  parse_range(args.range)
  corpus_file(args.corpus)
  return dense.check_job(args, [("num_negatives", args.num_negatives >= 1, ">= 1"),
                                ("seed", args.seed >= 0, ">= 0")])


class Miner:
  """Rewrites batches of records with negatives mined by the job's model (`shards.MakeRecords`)."""

  def __init__(self, job: dense.Job):
    from o1jax.retrieval import search  # pylint: disable=g-import-not-at-top (loads jax)
    self.job = job
    args = job.args
    self.start, self.end = parse_range(args.range)
    corpus = readers.read_corpus(corpus_file(args.corpus))
    if len(corpus) <= self.start:
      raise ValueError(f"--range={args.range}: the corpus {args.corpus} has {len(corpus)} documents, no rank "
                       f"{self.start}")
    self.doc_ids = list(corpus)
    self.texts = [document_text(corpus[d].title, corpus[d].text) for d in self.doc_ids]
    self.encoder = dense.load_encoder(job.model, args.batch_size, args.cache_dir)
    self.searcher = search.build_searcher(self.encoder.encode_corpus(self.texts), args.search, self.end)
    backend = "scann" if isinstance(self.searcher, search.ScannSearch) else "exact"
    self.description = (f"{self.encoder.name}; {backend} search; {args.num_negatives} sampled from ranks "
                        f"[{self.start}, {self.end}), positives excluded; seed {args.seed}")

  def candidates(self, record: ThoughtRecord, ranked: np.ndarray) -> list[int]:
    """Corpus rows of ranks [start, end) that are not the record's positives."""
    rows = [int(i) for i in ranked[self.start:self.end] if i >= 0]  # -1: fewer hits than asked
    if record.positive_ids:
      positives = set(record.positive_ids)
      return [i for i in rows if self.doc_ids[i] not in positives]
    positives = set(record.positives)
    return [i for i in rows if self.texts[i] not in positives]

  def sample(self, record: ThoughtRecord, candidates: list[int]) -> list[int]:
    n = self.job.args.num_negatives
    if len(candidates) <= n:
      return candidates
    rng = np.random.default_rng(stable_hash("mine", self.job.args.seed, record.query_id))
    return [candidates[i] for i in np.sort(rng.choice(len(candidates), n, replace=False))]

  def records(self, chunk: list[ThoughtRecord], bad: dict[str, str]) -> list[ThoughtRecord]:
    good = []
    for record in chunk:
      if record.query.strip():
        good.append(record)
      else:
        dense.set_aside(self.job, record.query_id, "empty query text", bad)
    if not good:
      return []
    ranked, _ = self.searcher.search(self.encoder.encode_queries([r.query for r in good]), self.end)
    out = []
    for record, row in zip(good, ranked):
      candidates = self.candidates(record, row)
      if not candidates:
        dense.set_aside(self.job, record.query_id, f"no negative in ranks [{self.start}, {self.end}) once its "
                        "positives are excluded", bad)
        continue
      chosen = self.sample(record, candidates)
      out.append(dataclasses.replace(
          record, negatives=tuple(self.texts[i] for i in chosen), negative_ids=tuple(self.doc_ids[i] for i in chosen),
          positive_scores=np.zeros(0, np.float32), negative_scores=np.zeros(0, np.float32), teacher="",
          miner=self.description))
    return out


def main(argv: Sequence[str]) -> dict[str, Any]:
  return dense.rewrite(check_args(argv), lambda job: Miner(job).records, "mine")


def cli() -> None:
  """`python -m data_tools.mine`: bad input ends it with one line and exit status 1."""
  shards.run_command(PROG, main, sys.argv[1:])


if __name__ == "__main__":
  cli()
