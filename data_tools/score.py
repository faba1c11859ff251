"""Teacher scores for distillation: a dense model scores every positive and negative passage of every record.

  python -m data_tools.score --input=thoughts/scifact-mined/manifest.json --model=minilm \
      --out=thoughts/scifact-scored

`--model` as in `data_tools.mine` (see `data_tools.dense`); it may differ from the model that mined. A score is
the cosine of the query's and the passage's unit vectors (equal to their dot product, what the model retrieves
with) divided by `--temperature` (default 0.02, METHOD's tau): the trainer takes teacher scores as logits
(softmax over the query's group, METHOD §3), and raw cosines, a few hundredths apart, would make an almost uniform
teacher; dividing by the student's own tau makes the teacher's distribution the one the model would have if it
ranked as the teacher does. `--temperature=1` stores the raw cosine. o1jax models embed the query without thinking. Records keep every other field;
`positive_scores` / `negative_scores` are replaced and `teacher` names the model and the similarity. A record
with an empty query or passage is a bad query: the run stops naming it, or `--skip_bad` leaves it out and lists
it in the manifest. Output, workers and restarts: `data_tools.dense`.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import sys
from typing import Any

import numpy as np

from data_tools import dense
from data_tools import shards
from data_tools.record import ThoughtRecord

PROG = "python -m data_tools.score"
SIMILARITY = "cosine"


def check_args(argv: Sequence[str]) -> dense.Job:
  p = dense.parser(PROG, __doc__.split("\n\n")[0])
  p.add_argument("--temperature", type=float, default=0.02,
                 help="teacher logits = cosine / temperature (the student's tau; 1 keeps the raw cosine)")
  args = p.parse_args(argv)
  return dense.check_job(args, [("temperature", 0 < args.temperature < float("inf"), "a positive number")])


class Scorer:
  """Rewrites batches of records with the job's model's scores (`shards.MakeRecords`)."""

  def __init__(self, job: dense.Job):
    self.job = job
    self.encoder = dense.load_encoder(job.model, job.args.batch_size)
    self.temperature = job.args.temperature
    self.teacher = f"{self.encoder.name}; {SIMILARITY} / {self.temperature:g}"

  def records(self, chunk: list[ThoughtRecord], bad: dict[str, str]) -> list[ThoughtRecord]:
    good = []
    for record in chunk:
      empty = [f"{field} {i}" for field in ("positives", "negatives")
               for i, text in enumerate(getattr(record, field)) if not text.strip()]
      if not record.query.strip():
        dense.set_aside(self.job, record.query_id, "empty query text", bad)
      elif empty:
        dense.set_aside(self.job, record.query_id, f"empty passage text ({', '.join(empty)})", bad)
      else:
        good.append(record)
    if not good:
      return []
    queries = self.encoder.encode_queries([r.query for r in good])
    passages = self.encoder.encode_docs([p for r in good for p in (*r.positives, *r.negatives)])
    out, first = [], 0
    for record, query in zip(good, queries):
      num_pos, num_neg = len(record.positives), len(record.negatives)
      scores = passages[first:first + num_pos + num_neg] @ query / self.temperature
      first += num_pos + num_neg
      out.append(dataclasses.replace(record, positive_scores=scores[:num_pos].astype(np.float32),
                                     negative_scores=scores[num_pos:].astype(np.float32), teacher=self.teacher))
    return out


def main(argv: Sequence[str]) -> dict[str, Any]:
  return dense.rewrite(check_args(argv), lambda job: Scorer(job).records, "score")


def cli() -> None:
  """`python -m data_tools.score`: bad input ends it with one line and exit status 1."""
  shards.run_command(PROG, main, sys.argv[1:])


if __name__ == "__main__":
  cli()
