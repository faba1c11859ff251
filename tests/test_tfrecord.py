"""TFRecord framing and tf.train.Example coding, checked against TensorFlow's own reader and writer."""
import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from o1jax.data import tfrecord

EXAMPLES = [
    {"query_id": ["q1"], "thoughts": ["première idée", "second \u2603 thought"],
     "scores": np.array([1.5, -2.25, 3.0], np.float32), "chosen": [1], "negatives": []},
    {"query_id": ["q2"], "thoughts": [b"\x00raw bytes"], "scores": [0.5, 7.0], "chosen": [0, -3, 2**40],
     "negatives": ["n1", "n2", "n3"]},
    {"query_id": ["q3"], "thoughts": [""], "scores": np.zeros(0, np.float32), "chosen": np.array([True]),
     "negatives": ["n4"]},
]


def _write(path: pathlib.Path, examples=EXAMPLES) -> pathlib.Path:
  with tfrecord.TFRecordWriter(path) as w:
    for ex in examples:
      w.write_example(ex)
  assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
  return path


def _as_bytes(values):
  return [v.encode() if isinstance(v, str) else v for v in values]


def test_round_trip(tmp_path):
  path = _write(tmp_path / "a.tfrecord")
  assert not (tmp_path / "a.tfrecord.tmp").exists()
  decoded = list(tfrecord.read_examples(path))
  assert len(decoded) == 3 == tfrecord.count_records(path)
  for want, got in zip(EXAMPLES, decoded):
    assert got["query_id"] == _as_bytes(want["query_id"])
    assert got["thoughts"] == _as_bytes(want["thoughts"])
    np.testing.assert_array_equal(got["scores"], np.asarray(want["scores"], np.float32))
    np.testing.assert_array_equal(got["chosen"], np.asarray(want["chosen"], np.int64))
    assert list(got["negatives"]) == _as_bytes(want["negatives"])
  assert tfrecord.feature_text(decoded[0], "thoughts") == EXAMPLES[0]["thoughts"]


def test_masked_crc_known_value():
  # CRC32C("123456789") = 0xE3069283 (the standard check value); masking: rotr 15, + 0xa282ead8.
  crc = 0xE3069283
  assert tfrecord.masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def tf():
  return pytest.importorskip("tensorflow")


def test_tensorflow_reads_our_files(tmp_path, tf):
  path = _write(tmp_path / "ours.tfrecord")
  spec = {"query_id": tf.io.FixedLenFeature([], tf.string), "thoughts": tf.io.VarLenFeature(tf.string),
          "scores": tf.io.VarLenFeature(tf.float32), "chosen": tf.io.VarLenFeature(tf.int64),
          "negatives": tf.io.VarLenFeature(tf.string)}
  parsed = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(path))]
  assert len(parsed) == 3
  for want, got in zip(EXAMPLES, parsed):
    assert got["query_id"].numpy() == _as_bytes(want["query_id"])[0]
    assert list(tf.sparse.to_dense(got["thoughts"]).numpy()) == _as_bytes(want["thoughts"])
    np.testing.assert_array_equal(tf.sparse.to_dense(got["scores"]).numpy(), np.asarray(want["scores"], np.float32))
    np.testing.assert_array_equal(tf.sparse.to_dense(got["chosen"]).numpy(), np.asarray(want["chosen"], np.int64))
    assert list(tf.sparse.to_dense(got["negatives"]).numpy()) == _as_bytes(want["negatives"])


def test_we_read_tensorflow_files(tmp_path, tf):
  path = tmp_path / "theirs.tfrecord"
  with tf.io.TFRecordWriter(str(path)) as w:
    for i in range(4):
      ex = tf.train.Example(features=tf.train.Features(feature={
          "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"doc {i}".encode()] * i)),
          "score": tf.train.Feature(float_list=tf.train.FloatList(value=[i / 3])),
          "ids": tf.train.Feature(int64_list=tf.train.Int64List(value=range(i))),
      }))
      w.write(ex.SerializeToString())
  decoded = list(tfrecord.read_examples(path))
  assert [d["text"] for d in decoded] == [[f"doc {i}".encode()] * i for i in range(4)]
  np.testing.assert_array_equal([d["score"][0] for d in decoded], np.float32([0, 1 / 3, 2 / 3, 1]))
  assert [d["ids"].tolist() for d in decoded] == [list(range(i)) for i in range(4)]


def test_tensorflow_rejects_what_we_reject(tmp_path, tf):
  path = _write(tmp_path / "bad.tfrecord")
  data = bytearray(path.read_bytes())
  data[-6] ^= 0x01  # inside the last record's data
  path.write_bytes(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    list(tf.data.TFRecordDataset(str(path)))
  with pytest.raises(tfrecord.TFRecordError, match="record 2 at byte offset"):
    list(tfrecord.read_records(path))


def _offsets(path):
  offsets, offset = [], 0
  for data in tfrecord.read_records(path):
    offsets.append(offset)
    offset += 12 + len(data) + 4
  return offsets


def test_data_crc_corruption_names_file_record_and_offset(tmp_path):
  path = _write(tmp_path / "c.tfrecord")
  offsets = _offsets(path)
  data = bytearray(path.read_bytes())
  data[offsets[1] + 12 + 3] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(tfrecord.TFRecordError) as err:
    list(tfrecord.read_records(path))
  assert str(err.value) == f"{path}: record 1 at byte offset {offsets[1]}: data CRC mismatch (corrupt record)"
  assert (err.value.index, err.value.offset) == (1, offsets[1])


def test_length_corruption_detected(tmp_path):
  path = _write(tmp_path / "l.tfrecord")
  offsets = _offsets(path)
  data = bytearray(path.read_bytes())
  data[offsets[2]] ^= 0x04  # the length field itself
  path.write_bytes(bytes(data))
  with pytest.raises(tfrecord.TFRecordError, match=rf"record 2 at byte offset {offsets[2]}: length CRC mismatch"):
    list(tfrecord.read_records(path))


@pytest.mark.parametrize("cut", [1, 4, 20, 200])
def test_truncation_detected(tmp_path, cut):
  path = _write(tmp_path / "t.tfrecord")
  offsets = _offsets(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - cut] if cut < len(data) - offsets[2] else data[:offsets[2] + 5])
  with pytest.raises(tfrecord.TFRecordError, match=rf"{path}: record 2 at byte offset {offsets[2]}: truncated"):
    list(tfrecord.read_records(path))


def test_non_example_record_is_named(tmp_path):
  path = tmp_path / "n.tfrecord"
  with tfrecord.TFRecordWriter(path) as w:
    w.write_example({"a": ["x"]})
    w.write(b"\xff\xff\xff")  # valid framing, invalid protobuf
  with pytest.raises(tfrecord.TFRecordError, match=r"record 1 at byte offset \d+: not a tf.train.Example"):
    list(tfrecord.read_examples(path))


def test_writer_is_atomic(tmp_path):
  path = tmp_path / "w.tfrecord"
  path.write_bytes(b"previous complete file")
  with pytest.raises(RuntimeError):
    with tfrecord.TFRecordWriter(path) as w:
      w.write_example({"a": ["x"]})
      raise RuntimeError("killed mid-shard")
  assert path.read_bytes() == b"previous complete file"
  assert not (tmp_path / "w.tfrecord.tmp").exists()


def test_encode_rejects_ambiguous_values():
  with pytest.raises(TypeError, match="feature 'q'.*single str"):
    tfrecord.encode_example({"q": "not a list"})
  with pytest.raises(TypeError, match="feature 'mix'"):
    tfrecord.encode_example({"mix": ["a", 1]})


def test_encoding_is_byte_identical_across_processes():
  # Protobuf map order follows the process's hash seed unless serialization is deterministic.
  code = ("import sys; from o1jax.data import tfrecord; "
          "sys.stdout.write(tfrecord.encode_example({k: [k] for k in 'abcdefghijklmnop'}).hex())")
  outputs = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
  assert len(outputs) == 1
