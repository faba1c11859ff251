"""Rectangular slices of safetensors tensors, read with `pread` so that only the slice's bytes are read.

safetensors' own `get_slice` does not do this: its `"pread"` backend reads the whole tensor, and its default
`"mmap"` backend maps the file, where a column slice of a row-major tensor touches every page (a 1/8 column slice
of a 64 MiB float32 tensor faulted in all 64 MiB here). This reader parses the header itself (the format: an
8-byte little-endian header size, then a JSON header giving each tensor's dtype, shape and byte range) and reads
each contiguous run of a slice straight into the output array. `bytes_read` counts the tensor bytes read.

Contract: `read(name, bounds)` returns exactly `tensor[bounds]` (a C-ordered numpy array in the file's dtype);
every header fault (not safetensors, a byte range that does not match the shape or lies past the end of the file,
an unknown dtype) raises `ConversionError` naming the file and tensor when the file is opened.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from o1jax.convert.layout import ConversionError

Bounds = tuple[tuple[int, int], ...]  # (start, stop) per dimension

# safetensors dtype names -> numpy dtypes (all little-endian in the file). Integer types are listed so that a
# quantized checkpoint is refused by name (layout.checked_cast), not as an unknown dtype.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces


def _runs(shape: tuple[int, ...], bounds: Bounds):
  """(element offset, element count) of each contiguous run of `tensor[bounds]` in the file, in C order."""
  strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
  partial = [i for i, (a, b) in enumerate(bounds) if (a, b) != (0, shape[i])]
  if not partial:
    yield 0, math.prod(shape)
    return
  inner = partial[-1]  # dimensions after it are whole, so one run spans them
  start, stop = bounds[inner]
  count = (stop - start) * strides[inner]
  for outer in itertools.product(*(range(a, b) for a, b in bounds[:inner])):
    yield sum(o * s for o, s in zip(outer, strides)) + start * strides[inner], count


class SafetensorsFile:
  """One open safetensors file: its tensors' names, shapes and dtypes, and sliced reads of them."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.bytes_read = 0
    try:
      self._fd = os.open(self.path, os.O_RDONLY)
    except OSError as e:
      raise ConversionError(f"{self.path}: cannot open: {e}") from e
    try:
      self._tensors = self._read_header()
    except BaseException:
      os.close(self._fd)
      raise

  def _read_header(self) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Tensor name -> (dtype, shape, absolute byte offset of its data)."""
    size = os.fstat(self._fd).st_size
    raw = os.pread(self._fd, 8, 0)
    length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
      raise ConversionError(f"{self.path}: not a safetensors file (truncated or corrupt header)")
    try:
      header = json.loads(os.pread(self._fd, length, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{self.path}: not a safetensors file (corrupt header: {e})") from e
    if not isinstance(header, dict):
      raise ConversionError(f"{self.path}: not a safetensors file (the header is not a JSON object)")
    data_start = 8 + length
    tensors = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        begin, end = (int(offset) for offset in info["data_offsets"])
      except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{self.path}: tensor {name!r} has a malformed header entry: {info!r}") from e
      if dtype not in DTYPES:
        raise ConversionError(f"{self.path}: tensor {name!r} has dtype {dtype}, which o1jax does not read")
      nbytes = math.prod(shape) * DTYPES[dtype].itemsize
      if end - begin != nbytes or begin < 0 or data_start + end > size:
        raise ConversionError(f"{self.path}: tensor {name!r} has byte range {begin}..{end} for {nbytes} bytes of "
                              f"data in a file of {size} bytes (truncated or corrupt?)")
      tensors[name] = (DTYPES[dtype], shape, data_start + begin)
    return tensors

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._tensors[name][1]

  def read(self, name: str, bounds: Bounds | None = None) -> np.ndarray:
    """`tensor[bounds]` (the whole tensor when None), reading only its bytes."""
    dtype, shape, offset = self._tensors[name]
    bounds = tuple((0, d) for d in shape) if bounds is None else tuple(bounds)
    if len(bounds) != len(shape) or not all(0 <= a <= b <= d for (a, b), d in zip(bounds, shape)):
      raise ValueError(f"{self.path}: bounds {bounds} lie outside tensor {name!r} of shape {shape}")
    out = np.empty(tuple(b - a for a, b in bounds), dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    pos = 0
    for start, count in _runs(shape, bounds):
      end = pos + count * dtype.itemsize
      self._pread_into(view[pos:end], offset + start * dtype.itemsize, name)
      pos = end
    self.bytes_read += pos
    return out

  def _pread_into(self, buffer: memoryview, offset: int, name: str) -> None:
    while len(buffer):
      try:
        n = os.preadv(self._fd, [buffer], offset)
      except OSError as e:
        raise ConversionError(f"{self.path}: cannot read tensor {name!r}: {e}") from e
      if n == 0:
        raise ConversionError(f"{self.path}: tensor {name!r} ends past the end of the file (truncated?)")
      buffer, offset = buffer[n:], offset + n

  def close(self) -> None:
    os.close(self._fd)

  def __enter__(self) -> SafetensorsFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
