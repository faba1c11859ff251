"""o1jax parameters built directly on a mesh from slices of HF-named tensors: each process reads only what its
devices hold.

Contract: `assemble_sharded` returns the tree `layout.assemble` builds, bit for bit (the same casts, applied to
slices), as global jax.Arrays with the given shardings. Per parameter, a process reads the union of its devices'
slices once: devices that hold the same slice (replicated axes) share one read, and slices that tile a box are
read as that box. Read volume and host memory per process therefore fall with the number of processes that shard
a parameter; replicated parameters (norms) are read whole by every process.

Faults that depend only on the headers (names, shapes, dtypes) are found alike by every process. Those that depend
on values (a non-finite value, a stored tied head that differs from the embedding) may be seen by one process only:
the processes agree on them before returning, so that all of them raise instead of the others waiting in the next
collective for one that has exited.
"""
from __future__ import annotations

from collections.abc import Mapping
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from o1jax.convert import layout
from o1jax.convert.layout import ConversionError, Entry, Params
from o1jax.convert.sliced import Bounds, SafetensorsFile
from o1jax.model import ModelConfig


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
  return tuple(s.indices(d)[:2] for s, d in zip(index, shape))


def _size(bounds: Bounds) -> int:
  return math.prod(b - a for a, b in bounds)


def _reads(slices: set[Bounds]) -> list[Bounds]:
  """The boxes to read for these device slices: their bounding box when they tile it, else each slice once."""
  box = tuple((min(s[d][0] for s in slices), max(s[d][1] for s in slices)) for d in range(len(next(iter(slices)))))
  # Distinct slices of one sharding are disjoint blocks, so equal volume means they tile the box exactly.
  return [box] if _size(box) == sum(_size(s) for s in slices) else sorted(slices)


def _within(inner: Bounds, outer: Bounds) -> bool:
  return all(oa <= a and b <= ob for (a, b), (oa, ob) in zip(inner, outer))


class _Builder:
  """Reads the slices of one process's devices and places them, parameter by parameter."""

  def __init__(self, cfg: ModelConfig, tensors: Mapping[str, SafetensorsFile], source: str):
    self.tensors, self.source = tensors, source
    self.dtype = jnp.dtype(cfg.param_dtype)

  def _read(self, entry: Entry, bounds: Bounds) -> np.ndarray:
    """The o1jax-layout block `bounds` of one HF tensor (one layer of a stacked parameter), cast."""
    transposed = layout.transposed(entry.path)
    block = self.tensors[entry.hf_name].read(entry.hf_name, tuple(reversed(bounds)) if transposed else bounds)
    block = layout.checked_cast(self.source, entry.hf_name, block, self.dtype)
    return block.T if transposed else block

  def _read_box(self, stack: list[Entry], bounds: Bounds) -> np.ndarray:
    if stack[0].layer is None:
      return self._read(stack[0], bounds)
    (first, last), inner = bounds[0], bounds[1:]
    out = np.empty((last - first,) + tuple(b - a for a, b in inner), self.dtype)
    for layer in range(first, last):
      out[layer - first] = self._read(stack[layer], inner)
    return out

  def param(self, stack: list[Entry], shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> jax.Array:
    """One parameter (`stack`: its HF tensors, by layer for a stacked one) as a global array."""
    slices = {_bounds(index, shape) for index in sharding.addressable_devices_indices_map(shape).values()}
    blocks = {box: self._read_box(stack, box) for box in _reads(slices)}
    pieces = {}
    for s in slices:
      box = next(b for b in blocks if _within(s, b))
      pieces[s] = blocks[box][tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(s, box))]
    return jax.make_array_from_callback(shape, sharding, lambda index: pieces[_bounds(index, shape)])

  def check_tied_copy(self) -> None:
    """This process's share of the rows of a tied model's stored head against the same rows of the embedding."""
    head, embedding = self.tensors[layout.TIED_HEAD], self.tensors[layout.EMBEDDING]
    shape = embedding.shape(layout.EMBEDDING)
    if head.shape(layout.TIED_HEAD) != shape:
      raise layout.tied_copy_error(self.source)
    index, count = jax.process_index(), jax.process_count()
    share = ((shape[0] * index // count, shape[0] * (index + 1) // count),) + tuple((0, d) for d in shape[1:])
    if not np.array_equal(head.read(layout.TIED_HEAD, share), embedding.read(layout.EMBEDDING, share)):
      raise layout.tied_copy_error(self.source)


def _agree(failure: ConversionError | None, source: str) -> None:
  """Raises on every process when any process failed: one small collective (a flag per process), none with one
  process."""
  if jax.process_count() == 1:
    if failure is not None:
      raise failure
    return
  failed = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None)))
  if failure is not None:
    raise failure
  if failed.any():
    raise ConversionError(f"{source}: process {int(np.argmax(failed))} could not load its slices of the weights "
                          "(its log names the tensor)")


def assemble_sharded(cfg: ModelConfig, tensors: Mapping[str, SafetensorsFile], shardings: Params,
                     source: str) -> Params:
  """Builds the o1jax tree on the mesh, each process reading only its devices' slices.

  Args:
    cfg: the architecture; tensors are cast to `cfg.param_dtype`.
    tensors: every HF tensor name the checkpoint holds -> what holds it.
    shardings: a NamedSharding (or any jax Sharding) per parameter, in the o1jax tree's structure.
    source: what the tensors come from, for error messages.
  """
  wanted, tied_copy = layout.check_names(cfg, tensors, source)
  for e in wanted:
    layout.check_shape(source, e, tensors[e.hf_name].shape(e.hf_name))
  stacks: dict[tuple[str, ...], list[Entry]] = {}
  for e in wanted:
    stacks.setdefault(e.path, []).append(e)
  shapes = layout.expected_shapes(cfg)
  builder = _Builder(cfg, tensors, source)
  params: Params = {}
  failure = None
  try:
    if tied_copy:
      builder.check_tied_copy()
    for path, stack in stacks.items():
      layout.put(params, path, builder.param(stack, layout.get(shapes, path).shape, layout.get(shardings, path)))
  except ConversionError as e:
    failure = e
  _agree(failure, source)
  return params

