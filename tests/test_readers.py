"""Readers on the real shared data (counts from each SOURCE.md) and on malformed files (clear errors)."""
import collections
import gzip
import json

import pytest

from o1jax.data import readers
from o1jax.data.readers import DataFormatError


def _n_pairs(qrels):
  return sum(len(docs) for docs in qrels.values())


def test_scifact_beir(shared_dir):
  test = readers.load_beir(shared_dir / "data/beir-scifact", "test")
  assert len(test.corpus) == 5183 and len(test.queries) == 300 and _n_pairs(test.qrels) == 339
  train = readers.load_beir(shared_dir / "data/beir-scifact", "train")
  assert len(train.queries) == 809 and _n_pairs(train.qrels) == 919
  assert len(readers.read_beir_queries(shared_dir / "data/beir-scifact/queries.jsonl")) == 1109
  doc = test.corpus["4983"]
  assert doc.title.startswith("Microstructural development of human newborn cerebral white matter")
  assert doc.text.startswith("Alterations of the architecture of cerebral white matter")
  assert test.qrels["1"] == {"31715818": 1}


@pytest.mark.parametrize("split", ["dev", "test"])
def test_cosqa_beir(shared_dir, split):
  ds = readers.load_beir(shared_dir / "data/cosqa-retrieval", split)
  assert len(ds.corpus) == 6267 and len(ds.queries) == 500 and _n_pairs(ds.qrels) == 500
  assert {grade for docs in ds.qrels.values() for grade in docs.values()} == {1}
  assert all(doc.title == "" for doc in ds.corpus.values())


@pytest.mark.parametrize("year,passages,queries,judged,in_pool,rel2_in_pool", [
    ("19", 14581, 43, 9260, 4337, 1789),
    ("20", 14091, 54, 11386, 5004, 1097),
])
def test_trec_dl_pools(shared_dir, year, passages, queries, judged, in_pool, rel2_in_pool):
  directory = shared_dir / f"data/msmarco-trec-dl-pools/trec-dl{year}"
  with pytest.raises(DataFormatError, match=r"test\.tsv, line \d+, field 'corpus-id'"):
    readers.load_beir(directory, "test")  # official qrels judge passages outside the pool
  ds = readers.load_beir(directory, "test", require_judged_docs=False)
  assert (len(ds.corpus), len(ds.queries), _n_pairs(ds.qrels)) == (passages, queries, judged)
  pairs = [(grade, doc) for docs in ds.qrels.values() for doc, grade in docs.items() if doc in ds.corpus]
  assert len(pairs) == in_pool and sum(grade >= 2 for grade, _ in pairs) == rel2_in_pool


@pytest.mark.parametrize("name,topics,qrels_queries,judgements", [
    ("msmarco-passage.dev-subset", 6980, 6980, 7437),
    ("dl19-passage", 43, 43, 9260),
    ("dl20", 200, 54, 11386),
])
def test_trec_topics_and_qrels(shared_dir, name, topics, qrels_queries, judgements):
  directory = shared_dir / "data/msmarco-trec-dl-eval"
  assert len(readers.read_trec_topics(directory / f"topics.{name}.txt")) == topics
  qrels_name = "dl20-passage" if name == "dl20" else name
  qrels = readers.read_qrels(directory / f"qrels.{qrels_name}.txt")
  assert len(qrels) == qrels_queries and _n_pairs(qrels) == judgements


@pytest.mark.parametrize("dataset,queries,judgements", [
    ("scifact", 300, 339), ("nfcorpus", 323, 12334), ("arguana", 1406, 1406), ("fiqa", 648, 1706),
    ("scidocs", 1000, 29928), ("trec-covid", 50, 66334), ("hotpotqa", 7405, 14810), ("nq", 3452, 4201),
])
def test_beir_topics_qrels_gz(shared_dir, dataset, queries, judgements):
  directory = shared_dir / "data/beir-topics-qrels"
  topics = readers.read_trec_topics(directory / f"topics.beir-v1.0.0-{dataset}.test.tsv.gz")
  qrels = readers.read_qrels(directory / f"qrels.beir-v1.0.0-{dataset}.test.txt.gz")
  assert len(topics) == queries and _n_pairs(qrels) == judgements
  assert set(qrels) <= set(topics)


def test_scifact_anserini_copy_matches_beir(shared_dir):
  beir = readers.load_beir(shared_dir / "data/beir-scifact", "test")
  directory = shared_dir / "data/beir-topics-qrels"
  assert readers.read_qrels(directory / "qrels.beir-v1.0.0-scifact.test.txt.gz") == beir.qrels
  assert readers.read_trec_topics(directory / "topics.beir-v1.0.0-scifact.test.tsv.gz") == beir.queries


def test_msmarco_triples(shared_dir):
  triples = list(readers.read_triples(shared_dir / "data/msmarco-train-toy/triples.tsv"))
  assert len(triples) == 100
  assert triples[0].query == "is a little caffeine ok during pregnancy"
  assert all(t.pos and t.neg for t in triples)


def test_dl21_groups_and_beir(shared_dir):
  directory = shared_dir / "data/msmarco-v2-dl21-train"
  groups = list(readers.read_grouped_jsonl(directory / "train_groups.jsonl.gz"))
  assert len(groups) == 52
  assert sum(len(g.pos) for g in groups) == 1864 and sum(len(g.neg) for g in groups) == 1364
  assert sum(bool(g.pos and g.neg) for g in groups) == 51
  assert sum(len(g.extra["bm25_unjudged_ids"]) for g in groups) == 2472
  assert all(len(g.extra["pos_ids"]) == len(g.pos) for g in groups)
  ds = readers.load_beir(directory, "dl21", require_judged_docs=False)
  assert len(ds.corpus) == 10553 and len(ds.queries) == 53 and _n_pairs(ds.qrels) == 10828
  grades = collections.Counter(g for docs in ds.qrels.values() for g in docs.values())
  assert grades == {0: 4338, 1: 3063, 2: 2341, 3: 1086}


# --- malformed input ---------------------------------------------------------------------------------------------


def _write(path, lines, compress=False):
  text = "".join(line + "\n" for line in lines)
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def _doc(doc_id, text="some text", title="t"):
  return json.dumps({"_id": doc_id, "title": title, "text": text})


@pytest.mark.parametrize("bad_line,field", [
    ('{"_id": "2", "title": "t", "text": "x"', "<json>"),
    ('{"title": "t", "text": "x"}', "_id"),
    ('{"_id": "2", "title": "t"}', "text"),
    ('{"_id": "2", "title": "t", "text": "   "}', "text"),
    ('{"_id": "2", "title": "t", "text": 5}', "text"),
    ('["not", "an", "object"]', "<json>"),
    ('{"_id": "1", "title": "t", "text": "dup"}', "_id"),
])
@pytest.mark.parametrize("compress", [False, True])
def test_bad_corpus_line(tmp_path, bad_line, field, compress):
  path = _write(tmp_path / ("corpus.jsonl.gz" if compress else "corpus.jsonl"),
                [_doc("1"), "", bad_line, _doc("3")], compress)
  with pytest.raises(DataFormatError) as info:
    readers.read_beir_corpus(path)
  assert (info.value.path, info.value.line, info.value.field) == (str(path), 3, field)
  assert f"{path}, line 3, field {field!r}" in str(info.value)


def test_bad_query_line(tmp_path):
  path = _write(tmp_path / "queries.jsonl", ['{"_id": "q1", "text": "ok"}', '{"_id": "q2", "text": ""}'])
  with pytest.raises(DataFormatError, match=r"queries\.jsonl, line 2, field 'text': empty text"):
    readers.read_beir_queries(path)


@pytest.mark.parametrize("bad_line,field", [
    ("q1\td1", "columns"),
    ("q1\td1\thigh", "score"),
    ("q1 0 d1 1 extra", "columns"),
    ("q1\td1\t1", "corpus-id"),  # judged twice
])
def test_bad_qrels_line(tmp_path, bad_line, field):
  path = _write(tmp_path / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", bad_line])
  with pytest.raises(DataFormatError) as info:
    readers.read_qrels(path)
  assert (info.value.line, info.value.field) == (3, field)


def _beir_dir(tmp_path, qrels_lines):
  _write(tmp_path / "corpus.jsonl", [_doc("d1"), _doc("d2")])
  _write(tmp_path / "queries.jsonl", ['{"_id": "q1", "text": "a"}', '{"_id": "q2", "text": "b"}'])
  (tmp_path / "qrels").mkdir()
  _write(tmp_path / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", *qrels_lines])
  return tmp_path


def test_load_beir_ids(tmp_path):
  ds = readers.load_beir(_beir_dir(tmp_path, ["q1\td2\t2"]), "test")
  assert ds.queries == {"q1": "a"} and ds.qrels == {"q1": {"d2": 2}} and ds.corpus["d1"] == readers.Doc("t", "some text")


@pytest.mark.parametrize("bad_line,field", [("q1\td9\t1", "corpus-id"), ("q9\td1\t1", "query-id")])
def test_load_beir_missing_ids(tmp_path, bad_line, field):
  directory = _beir_dir(tmp_path, ["q1\td1\t1", bad_line])
  with pytest.raises(DataFormatError, match=rf"test\.tsv, line 3, field '{field}'"):
    readers.load_beir(directory, "test")


def test_load_beir_empty_corpus(tmp_path):
  directory = _beir_dir(tmp_path, ["q1\td1\t1"])
  _write(directory / "corpus.jsonl", [])
  with pytest.raises(DataFormatError, match="empty corpus"):
    readers.load_beir(directory, "test")


def test_bad_topics_triples_groups(tmp_path):
  with pytest.raises(DataFormatError, match=r"line 2, field 'columns'"):
    readers.read_trec_topics(_write(tmp_path / "topics.tsv", ["1\tok", "2 no tab"]))
  with pytest.raises(DataFormatError, match=r"line 1, field 'neg'"):
    list(readers.read_triples(_write(tmp_path / "triples.tsv", ["q\tp\t "])))
  with pytest.raises(DataFormatError, match=r"line 1, field 'columns'"):
    list(readers.read_triples(_write(tmp_path / "triples2.tsv", ["q\tp"])))
  groups = _write(tmp_path / "groups.jsonl", [json.dumps({"query": "q", "pos": ["p"]}),
                                              json.dumps({"query": "q", "pos": ["p", 3], "neg": []})])
  with pytest.raises(DataFormatError, match=r"line 2, field 'pos\[1\]'"):
    list(readers.read_grouped_jsonl(groups))
  first = next(readers.read_grouped_jsonl(groups))
  assert (first.query_id, first.pos, first.neg, first.extra) == ("1", ["p"], [], {})
  with pytest.raises(DataFormatError, match=r"line 1, field 'pos': no positives"):
    list(readers.read_grouped_jsonl(_write(tmp_path / "g2.jsonl", [json.dumps({"query": "q", "pos": []})])))


@pytest.mark.parametrize("compress", [False, True])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, compress):
  path = tmp_path / ("corpus.jsonl.gz" if compress else "corpus.jsonl")
  data = (_doc("1") + "\n\n").encode() + b'{"_id": "2", "text": "caf\xe9"}\n'  # 0xe9 alone is not UTF-8
  path.write_bytes(gzip.compress(data) if compress else data)
  with pytest.raises(DataFormatError) as info:
    readers.read_beir_corpus(path)
  assert (info.value.path, info.value.line, info.value.field) == (str(path), 3, "<utf-8>")
  assert "not UTF-8 text (byte 0xe9, byte 26 of the line)" in str(info.value)


def test_truncated_gzip_names_the_file_and_line(tmp_path):
  path = tmp_path / "queries.jsonl.gz"
  full = gzip.compress("".join(json.dumps({"_id": f"q{i}", "text": "t" * 50}) + "\n" for i in range(400)).encode())
  path.write_bytes(full[:len(full) // 2])
  with pytest.raises(DataFormatError, match=rf"{path}, line \d+, field '<gzip>': unreadable compressed data"):
    readers.read_beir_queries(path)


def test_several_splits_share_one_read_of_the_corpus_and_queries(shared_dir):
  scifact = shared_dir / "data" / "beir-scifact"
  splits = readers.load_beir_splits(scifact, ["train", "test"])
  assert splits["train"].corpus is splits["test"].corpus
  for split in ("train", "test"):
    assert splits[split] == readers.load_beir(scifact, split)
