"""The synthesized training record and its `tf.train.Example` layout.

Features (bytes lists are UTF-8 text):
  query_id, query, thought          bytes [1]       thought = thoughts[chosen], the behavior-cloning target
  thoughts                          bytes [k]       the non-empty candidates, in candidate order (k <= --k); ("",) for
                                                    a record ingested without a thought (`--keep_missing`)
  positives, negatives              bytes [P], [N]  passages (`{title} {text}` for BEIR)
  positive_ids, negative_ids        bytes [P], [N]  corpus ids when known (empty otherwise)
  committee_members                 bytes [M]       member names
  committee_weights                 float [M]
  committee_scores                  float [M * k]   row-major [member, candidate] raw scores; NaN where no member
                                                    scored a candidate (an ingested thought outside all_thought)
  vote                              bytes [1]       "soft" or "hard"; "given" when the choice came with ingested data
                                                    (vote_totals 1 at chosen), "none" for a record without a thought
  vote_totals                       float [k]       what the vote maximized
  chosen                            int64 [1]
  positive_scores, negative_scores  float [P], [N]  teacher scores for distillation (empty when not scored)
  teacher                           bytes [1]       the model that gave them ("" when not scored)
  miner                             bytes [1]       how the negatives were found ("" when they came with the data)
  task_type                         bytes [1]       the source's task label (the reference's `type`; "" if none)

A record read back keeps every field; shards written before the teacher fields existed read as unscored.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses

import numpy as np

from o1jax.data import tfrecord


@dataclasses.dataclass(frozen=True)
class ThoughtRecord:
  query_id: str
  query: str
  thoughts: tuple[str, ...]
  chosen: int
  positives: tuple[str, ...]
  negatives: tuple[str, ...]
  positive_ids: tuple[str, ...]
  negative_ids: tuple[str, ...]
  committee_members: tuple[str, ...]
  committee_weights: np.ndarray  # [M]
  committee_scores: np.ndarray  # [M, k]
  vote: str
  vote_totals: np.ndarray  # [k]
  positive_scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))  # [P] or []
  negative_scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))  # [N] or []
  teacher: str = ""
  miner: str = ""
  task_type: str = ""

  @property
  def thought(self) -> str:
    return self.thoughts[self.chosen]

  def to_example(self) -> bytes:
    return tfrecord.encode_example({
        "query_id": [self.query_id], "query": [self.query], "thought": [self.thought],
        "thoughts": list(self.thoughts), "positives": list(self.positives), "negatives": list(self.negatives),
        "positive_ids": list(self.positive_ids), "negative_ids": list(self.negative_ids),
        "committee_members": list(self.committee_members),
        "committee_weights": np.asarray(self.committee_weights, np.float32),
        "committee_scores": np.asarray(self.committee_scores, np.float32).ravel(),
        "vote": [self.vote], "vote_totals": np.asarray(self.vote_totals, np.float32), "chosen": [self.chosen],
        "positive_scores": np.asarray(self.positive_scores, np.float32),
        "negative_scores": np.asarray(self.negative_scores, np.float32),
        "teacher": [self.teacher], "miner": [self.miner], "task_type": [self.task_type]})


def from_features(features: Mapping[str, tfrecord.DecodedFeature]) -> ThoughtRecord:
  """Inverse of `ThoughtRecord.to_example` after `tfrecord.decode_example`; checks the layout."""

  def text(key: str) -> tuple[str, ...]:
    return tuple(tfrecord.feature_text(features, key))

  def optional_text(key: str) -> str:
    return (text(key) or ("",))[0]

  def floats(key: str) -> np.ndarray:
    return np.asarray(features.get(key, []), np.float32)

  thoughts, members = text("thoughts"), text("committee_members")
  chosen = int(np.asarray(features["chosen"])[0])
  scores = floats("committee_scores")
  if scores.size != len(members) * len(thoughts) or not 0 <= chosen < len(thoughts):
    raise ValueError(f"query {text('query_id')}: inconsistent record ({len(members)} members, {len(thoughts)} "
                     f"thoughts, {scores.size} scores, chosen {chosen})")
  record = ThoughtRecord(
      query_id=text("query_id")[0], query=text("query")[0], thoughts=thoughts, chosen=chosen,
      positives=text("positives"), negatives=text("negatives"), positive_ids=text("positive_ids"),
      negative_ids=text("negative_ids"), committee_members=members, committee_weights=floats("committee_weights"),
      committee_scores=scores.reshape(len(members), len(thoughts)), vote=text("vote")[0],
      vote_totals=floats("vote_totals"), positive_scores=floats("positive_scores"),
      negative_scores=floats("negative_scores"), teacher=optional_text("teacher"), miner=optional_text("miner"),
      task_type=optional_text("task_type"))
  for field, scores, passages in (("positive_scores", record.positive_scores, record.positives),
                                  ("negative_scores", record.negative_scores, record.negatives)):
    if scores.size not in (0, len(passages)):
      raise ValueError(f"query {record.query_id!r}: {scores.size} {field} for {len(passages)} passages")
  if text("thought")[0] != record.thought:
    raise ValueError(f"query {record.query_id!r}: thought is not thoughts[chosen]")
  return record


def read_shard(path: tfrecord.PathLike) -> list[ThoughtRecord]:
  """Every record of a shard (CRCs verified)."""
  return [from_features(features) for features in tfrecord.read_examples(path)]
