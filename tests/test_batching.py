"""Batching of training records into fixed-shape host batches, and the synthetic dataset."""
import logging

import bm25s
import numpy as np
import pytest

from o1jax import templates
from o1jax.data import batching, synthetic, tfrecord
from o1jax.tokenizer import SpecialIds

LENGTHS = templates.Lengths(query=8, query_thought=16, doc=12)


@pytest.fixture(scope="module")
def world():
  spec = synthetic.SyntheticSpec(num_topics=4, docs_per_topic=4, queries_per_doc=2)
  tokenizer = synthetic.make_tokenizer(spec)
  return synthetic.make_records(spec), tokenizer, SpecialIds.from_tokenizer(tokenizer)


def make_batcher(world, records=None, **spec_changes):
  recs, tokenizer, special = world
  spec = dict(batch_queries=8, group_size=4, lengths=LENGTHS, thought_drop=0.1, seed=3)
  spec.update(spec_changes)
  process = {k: spec.pop(k) for k in ("process_index", "process_count") if k in spec}
  return batching.Batcher(records if records is not None else recs, tokenizer, special, batching.BatchSpec(**spec),
                          **process)


def words(tokenizer, ids, mask):
  return tokenizer.convert_ids_to_tokens([int(i) for i, m in zip(ids, mask) if m])


def test_batch_follows_templates(world):
  records, tokenizer, special = world
  b = make_batcher(world, thought_drop=0.0).batch(0)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      "query_ids": ((8, 16), np.int32), "query_mask": ((8, 16), np.int32), "query_loss_mask": ((8, 16), np.int32),
      "doc_ids": ((32, 12), np.int32), "doc_mask": ((32, 12), np.int32)}
  by_query = {r["query"]: r for r in records}
  for row in range(8):
    toks = words(tokenizer, b["query_ids"][row], b["query_mask"][row])
    assert toks[:2] == ["<s>", "<query>"] and toks[-1] == "<emb>"
    end = toks.index("</query>")
    record = by_query[" ".join(toks[2:end])]
    assert toks[end:] == ["</query>", "<thought>", *record["thought"].split(), "</s>", "<emb>"]
    supervised = words(tokenizer, b["query_ids"][row], b["query_loss_mask"][row])
    assert supervised == [*record["thought"].split(), "</s>"]
    docs = [" ".join(words(tokenizer, b["doc_ids"][row * 4 + g], b["doc_mask"][row * 4 + g])[1:-1]) for g in range(4)]
    assert docs[0] == record["positives"][0]
    assert len(set(docs[1:])) == 3 and set(docs[1:]) <= set(record["negatives"])
  # Padding is masked and uses the pad id.
  assert np.all(b["query_ids"][b["query_mask"] == 0] == special.pad)


def test_epochs_permute_and_batches_are_reproducible(world):
  batcher = make_batcher(world)
  assert batcher.steps_per_epoch == 4
  again = make_batcher(world)
  for i in (0, 5, 11):
    for k, v in batcher.batch(i).items():
      np.testing.assert_array_equal(v, again.batch(i)[k])
  no_drop = make_batcher(world, thought_drop=0.0)  # a dropped thought would change the row between epochs
  first_epoch = np.concatenate([no_drop.batch(i)["query_ids"] for i in range(4)])
  assert len({r.tobytes() for r in first_epoch}) == 32  # every record exactly once per epoch
  second_epoch = np.concatenate([no_drop.batch(i)["query_ids"] for i in range(4, 8)])
  assert not np.array_equal(first_epoch, second_epoch)
  assert {r.tobytes() for r in first_epoch} == {r.tobytes() for r in second_epoch}
  assert not np.array_equal(make_batcher(world, seed=4).batch(0)["query_ids"], batcher.batch(0)["query_ids"])


def test_processes_take_their_rows_of_the_same_global_batch(world):
  whole = make_batcher(world).batch(6)
  parts = [make_batcher(world, process_index=p, process_count=2).batch(6) for p in range(2)]
  for k, v in whole.items():
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)


def test_thought_drop_rate_and_mask(world):
  batcher = make_batcher(world, thought_drop=0.25)
  batches = [batcher.batch(i) for i in range(40)]
  dropped = np.concatenate([b["query_loss_mask"].sum(1) == 0 for b in batches])
  assert 0.18 < dropped.mean() < 0.32  # 320 draws: 4 standard deviations either side of 0.25
  _, tokenizer, _ = world
  b = batches[0]
  row = int(np.argmax(b["query_loss_mask"].sum(1) == 0))
  toks = words(tokenizer, b["query_ids"][row], b["query_mask"][row])
  assert toks[-3:] == ["</query>", "<thought>", "<emb>"]
  assert make_batcher(world, thought_drop=0.0).batch(0)["query_loss_mask"].sum(1).min() > 0


def test_few_negatives_are_cycled_and_teacher_scores_follow_documents(world):
  _, tokenizer, _ = world
  records = [{"query_id": f"q{i}", "query": f"t{i % 4} c{i}", "thought": "", "positives": [f"t0 e{i}", f"t1 e{i}"],
              "negatives": [f"t2 e{i}", f"t3 e{i}"], "positive_scores": [10.0 + i, 20.0 + i],
              "negative_scores": [30.0 + i, 40.0 + i]} for i in range(8)]
  b = make_batcher(world, records, group_size=6, teacher_scores=True).batch(0)
  for row in range(8):
    docs = [" ".join(words(tokenizer, b["doc_ids"][row * 6 + g], b["doc_mask"][row * 6 + g])[1:-1]) for g in range(6)]
    i = int(docs[0].split()[1][1:])
    expected = {f"t0 e{i}": 10.0 + i, f"t1 e{i}": 20.0 + i, f"t2 e{i}": 30.0 + i, f"t3 e{i}": 40.0 + i}
    np.testing.assert_array_equal(b["teacher_scores"][row], [expected[d] for d in docs])
    assert sorted(docs[1:]) == sorted([f"t2 e{i}"] * 3 + [f"t3 e{i}"] * 2) or \
        sorted(docs[1:]) == sorted([f"t2 e{i}"] * 2 + [f"t3 e{i}"] * 3)


@pytest.mark.parametrize("change, message", [
    ({"positives": []}, "record 5 (query_id 'q5'): field 'positives': is empty"),
    ({"negatives": "t0 e1"}, "record 5 (query_id 'q5'): field 'negatives': expected a list of strings"),
    ({"query": ""}, "record 5 (query_id 'q5'): field 'query': expected a non-empty string"),
    ({"positive_scores": [1.0, 2.0]}, "field 'positive_scores': expected 1 teacher scores"),
])
def test_bad_records_are_named(world, change, message):
  records = [{"query_id": f"q{i}", "query": "t0 c1", "thought": "e1", "positives": ["t0 e1"], "negatives": ["t0 e2"],
              "positive_scores": [1.0], "negative_scores": [0.0]} for i in range(8)]
  records[5] = {**records[5], **change}
  batcher = make_batcher(world, records, teacher_scores=True)
  with pytest.raises(batching.RecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
    batcher.batch(0)


class _Unreadable(list):
  """Records whose index 5 fails as a corrupt TFRecord record does when read."""

  def __getitem__(self, i):
    if i == 5:
      raise tfrecord.TFRecordError("shard.tfrecord", 5, 1234, "data CRC mismatch (corrupt record)")
    return super().__getitem__(i)


@pytest.mark.parametrize("bad", ["unreadable", "empty negatives"])
def test_skip_bad_puts_the_next_usable_record_in_place_of_a_bad_one(world, bad, caplog):
  records = list(world[0])
  if bad == "empty negatives":
    records[5] = {**records[5], "negatives": []}
  else:
    records = _Unreadable(records)
  strict, lenient = make_batcher(world, records), make_batcher(world, records, skip_bad=True)
  intact = make_batcher(world, list(world[0]), skip_bad=True)
  for i in range(lenient.steps_per_epoch):
    rows = np.random.default_rng([3, 0]).permutation(len(records))[i * 8:(i + 1) * 8]
    if 5 not in rows:
      for key, value in intact.batch(i).items():  # batches without it are those of the intact data
        np.testing.assert_array_equal(lenient.batch(i)[key], value)
      continue
    with pytest.raises((batching.RecordError, tfrecord.TFRecordError), match="record 5"):
      strict.batch(i)
    with caplog.at_level(logging.WARNING):
      batch = lenient.batch(i)
    row = list(rows).index(5)
    # Record 6's example for this epoch (its own positive, negatives and thought drop) stands in row `row`.
    substitute = intact._example(0, 6)  # pylint: disable=protected-access
    assert words(world[1], batch["doc_ids"][row * 4], batch["doc_mask"][row * 4])[1:-1] == \
        substitute[2][0].split()
    assert "skip_bad: record 5 replaced by the next usable record: " in caplog.text


def test_prefetcher_yields_the_same_batches_and_reraises(world):
  batcher = make_batcher(world)
  prefetch = batching.Prefetcher(batcher, start=3)
  try:
    for i in range(3, 9):
      np.testing.assert_array_equal(next(prefetch)["doc_ids"], batcher.batch(i)["doc_ids"])
  finally:
    prefetch.close()
  records = list(world[0])
  records[0] = {**records[0], "negatives": []}
  failing = batching.Prefetcher(make_batcher(world, records), start=0)
  with pytest.raises(batching.RecordError, match="'negatives'"):
    for _ in range(8):
      next(failing)
  failing.close()


def test_synthetic_thought_really_helps_lexical_retrieval():
  spec = synthetic.SyntheticSpec()
  records = synthetic.make_records(spec)
  assert records == synthetic.make_records(spec)
  corpus = sorted({d for r in records for d in r["positives"] + r["negatives"]})
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize(corpus, stopwords=None, show_progress=False), show_progress=False)

  def top1_accuracy(texts):
    hits, _ = retriever.retrieve(bm25s.tokenize(texts, stopwords=None, show_progress=False), k=1,
                                 show_progress=False)
    return np.mean([corpus[h] == r["positives"][0] for h, r in zip(hits[:, 0], records)])

  alone = top1_accuracy([r["query"] for r in records])
  with_thought = top1_accuracy([f"{r['query']} {r['thought']}" for r in records])
  assert with_thought == 1.0
  assert alone < 0.3  # about 1 / docs_per_topic plus filler-word luck


def test_synthetic_tokenizer_covers_every_word():
  spec = synthetic.SyntheticSpec(num_topics=2, docs_per_topic=3)
  tokenizer = synthetic.make_tokenizer(spec)
  special = SpecialIds.from_tokenizer(tokenizer)
  assert special.bos == tokenizer.convert_tokens_to_ids("<s>") and special.eos != special.pad
  texts = [t for r in synthetic.make_records(spec) for t in [r["query"], r["thought"], *r["positives"]]]
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
  assert tokenizer.unk_token_id not in {i for seq in ids for i in seq}
  assert [tokenizer.decode(seq) for seq in ids] == texts

