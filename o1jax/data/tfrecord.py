"""TFRecord files of `tf.train.Example` protos, read and written without TensorFlow.

Framing of each record (TensorFlow's `core/lib/io/record_writer.cc`):
  uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

The Example protos come from tensorflow-datasets' bundled copy of `tf.train.Example`
(same field numbers, hence the same wire format); CRC32C from `google-crc32c`. Paths may be local or in an
object store (`gs://...`, through `o1jax.storage`).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import hashlib
import os
import pathlib
import struct
import tempfile
from typing import Union

import google_crc32c
from google.protobuf import message as pb_message
import numpy as np
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

from o1jax import storage

_MASK_DELTA = 0xA282EAD8
HEADER = struct.Struct("<QI")  # length, masked crc of the 8 length bytes
FOOTER = struct.Struct("<I")  # masked crc of the data

PathLike = Union[str, os.PathLike]
FeatureValue = Union[Sequence[str], Sequence[bytes], Sequence[int], Sequence[float], np.ndarray]
DecodedFeature = Union[list[bytes], np.ndarray]


class TFRecordError(ValueError):
  """A corrupt, truncated or undecodable record; the message names file, record index and byte offset."""

  def __init__(self, path: PathLike, index: int, offset: int, problem: str):
    super().__init__(f"{os.fspath(path)}: record {index} at byte offset {offset}: {problem}")
    self.path, self.index, self.offset = os.fspath(path), index, offset


def masked_crc32c(data: bytes) -> int:
  """CRC32C rotated and offset, as TFRecord stores it (a CRC of data that embeds CRCs is weak otherwise)."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """One record in TFRecord framing."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc32c(length)) + data + FOOTER.pack(masked_crc32c(data))


class TFRecordWriter:
  """Writes records to `<path>.tmp`, renamed to `path` only by a successful `close()`; for a remote `path`, to a
  local temporary file uploaded as the object `path` by `close()`.

  A reader therefore never sees a partial file under the final name; on an exception inside a `with`
  block the temporary file is removed and `path` is left untouched.
  """

  def __init__(self, path: PathLike):
    self.remote = storage.is_remote(path)
    self.path = os.fspath(path) if self.remote else pathlib.Path(path)
    if self.remote:
      # pylint: disable-next=consider-using-with
      self._file = tempfile.NamedTemporaryFile("wb", suffix=".tfrecord", delete=False)
      self.tmp_path = pathlib.Path(self._file.name)
    else:
      self.tmp_path = self.path.with_name(self.path.name + ".tmp")
      self._file = open(self.tmp_path, "wb")  # pylint: disable=consider-using-with
    self.num_records = 0
    self._sha256 = hashlib.sha256()

  def write(self, data: bytes) -> None:
    framed = frame_record(data)
    self._file.write(framed)
    self._sha256.update(framed)
    self.num_records += 1

  @property
  def sha256(self) -> str:
    """Hex SHA-256 of the bytes written so far (the whole file once done), for manifests."""
    return self._sha256.hexdigest()

  def write_example(self, features: Mapping[str, FeatureValue]) -> None:
    self.write(encode_example(features))

  def close(self) -> None:
    """Flushes to disk and publishes the file under its final name."""
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    if self.remote:
      try:
        storage.put_file(self.tmp_path, self.path)
      finally:
        self.tmp_path.unlink()
    else:
      os.replace(self.tmp_path, self.path)

  def abort(self) -> None:
    self._file.close()
    self.tmp_path.unlink(missing_ok=True)

  def __enter__(self) -> TFRecordWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def read_records(path: PathLike) -> Iterator[bytes]:
  """Yields the data of every record, checking both CRCs; raises TFRecordError on corruption/truncation."""
  with storage.open(path, "rb") as f:
    index, offset = 0, 0
    while True:
      header = f.read(HEADER.size)
      if not header:
        return
      if len(header) < HEADER.size:
        raise TFRecordError(path, index, offset, f"truncated header ({len(header)} of {HEADER.size} bytes)")
      length, length_crc = HEADER.unpack(header)
      if masked_crc32c(header[:8]) != length_crc:
        raise TFRecordError(path, index, offset, "length CRC mismatch (corrupt header)")
      data = f.read(length)
      footer = f.read(FOOTER.size)
      if len(data) < length or len(footer) < FOOTER.size:
        raise TFRecordError(path, index, offset,
                            f"truncated record (expected {length} data bytes plus a 4-byte CRC)")
      if masked_crc32c(data) != FOOTER.unpack(footer)[0]:
        raise TFRecordError(path, index, offset, "data CRC mismatch (corrupt record)")
      yield data
      index += 1
      offset += HEADER.size + length + FOOTER.size


def count_records(path: PathLike) -> int:
  """Number of records in a file, verifying every CRC on the way."""
  return sum(1 for _ in read_records(path))


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
  """Serializes a `tf.train.Example`.

  The value's element type picks the list kind: str/bytes -> bytes_list, bool/int -> int64_list,
  float (or a float numpy array) -> float_list. An empty sequence is written as a feature with no kind,
  which TensorFlow parses as an empty list of whatever dtype the reader asks for.
  """
  example = example_pb2.Example()
  for key, values in features.items():
    feature = example.features.feature[key]
    if isinstance(values, (str, bytes)):
      raise TypeError(f"feature {key!r}: expected a sequence of values, got a single {type(values).__name__}")
    if not isinstance(values, np.ndarray):
      values = list(values)
    if len(values) == 0:
      feature.SetInParent()
    elif isinstance(values, np.ndarray) and values.dtype.kind == "f":
      feature.float_list.value.extend(values.astype(np.float32).ravel().tolist())
    elif isinstance(values, np.ndarray) and values.dtype.kind in "iub":
      feature.int64_list.value.extend(values.astype(np.int64).ravel().tolist())
    elif all(isinstance(v, (str, bytes)) for v in values):
      feature.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else v for v in values)
    elif all(isinstance(v, (bool, int, np.integer)) for v in values):
      feature.int64_list.value.extend(int(v) for v in values)
    elif all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
      feature.float_list.value.extend(float(v) for v in values)
    else:
      raise TypeError(f"feature {key!r}: values must all be str/bytes, all ints or all numbers")
  # Deterministic: map entries sorted by key, so the same features give the same bytes in every process.
  return example.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> dict[str, DecodedFeature]:
  """Parses a serialized `tf.train.Example`: bytes lists -> list[bytes], floats -> float32, ints -> int64.

  A feature with no kind (written for an empty list) decodes to an empty list.
  """
  example = example_pb2.Example.FromString(data)
  out: dict[str, DecodedFeature] = {}
  for key, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    if kind == "float_list":
      out[key] = np.asarray(feature.float_list.value, np.float32)
    elif kind == "int64_list":
      out[key] = np.asarray(feature.int64_list.value, np.int64)
    elif kind == "bytes_list":
      out[key] = list(feature.bytes_list.value)
    else:
      out[key] = []
  return out


def read_examples(path: PathLike) -> Iterator[dict[str, DecodedFeature]]:
  """Decoded Examples of a TFRecord file; a record that is not an Example raises TFRecordError."""
  offset = 0
  for index, data in enumerate(read_records(path)):
    try:
      yield decode_example(data)
    except pb_message.DecodeError as e:
      raise TFRecordError(path, index, offset, f"not a tf.train.Example ({e})") from e
    offset += HEADER.size + len(data) + FOOTER.size


def feature_text(features: Mapping[str, DecodedFeature], key: str) -> list[str]:
  """A bytes feature as a list of str (UTF-8)."""
  return [v.decode("utf-8") for v in features.get(key, [])]

