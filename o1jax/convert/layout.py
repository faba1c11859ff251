"""Mapping between o1jax's stacked parameter tree and Hugging Face tensor names, and checked assembly.

The o1jax tree mirrors Hugging Face's `*ForCausalLM` state dict: layers are stacked on a leading axis and Dense
`kernel`s are HF `weight`s transposed, so every conversion is a rename plus (un)stacking. The expected tree comes
from `jax.eval_shape(init_params)`, so optional tensors (biases, an untied LM head) follow the model's own rules.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import ModelConfig, init_params

Params = dict[str, Any]
EMBEDDING = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"  # stored by some tied checkpoints although the model has no head of its own


class ConversionError(ValueError):
  """A checkpoint does not match the architecture it claims (names the file and tensor)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One Hugging Face tensor: where it lives in the o1jax tree and its shape in HF layout."""
  hf_name: str
  path: tuple[str, ...]
  layer: int | None  # index on the stacked layer axis, None for unstacked parameters
  hf_shape: tuple[int, ...]


def expected_shapes(cfg: ModelConfig) -> Params:
  """The parameter tree `init_params(cfg)` builds, as ShapeDtypeStructs (nothing is allocated)."""
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def _flatten(tree: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _hf_name(path: tuple[str, ...], layer: int | None) -> str:
  leaf = {"kernel": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  module = ".".join(path[1:-1]) if layer is not None else ".".join(path[:-1])
  if layer is not None:
    return f"model.layers.{layer}.{module}.{leaf}"
  if path[0] == "lm_head":
    return f"lm_head.{leaf}"
  return f"model.{module}.{leaf}"


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every HF tensor of the model, in state-dict order (embeddings, layer 0..L-1, norm, head)."""
  flat = list(_flatten(expected_shapes(cfg)))

  def hf_shape(path, shape):
    return tuple(reversed(shape)) if transposed(path) else tuple(shape)

  out = [Entry(_hf_name(p, None), p, None, hf_shape(p, s.shape)) for p, s in flat if p[0] == "embed_tokens"]
  for i in range(cfg.num_hidden_layers):
    out += [Entry(_hf_name(p, i), p, i, hf_shape(p, s.shape[1:])) for p, s in flat if p[0] == "layers"]
  out += [Entry(_hf_name(p, None), p, None, hf_shape(p, s.shape))
          for p, s in flat if p[0] not in ("embed_tokens", "layers")]
  return out


def transposed(path: tuple[str, ...]) -> bool:
  """Whether the parameter at `path` is its HF tensor transposed (Dense kernels are, everything else is not)."""
  return path[-1] == "kernel"


def put(tree: Params, path: tuple[str, ...], value: Any) -> None:
  """Sets the leaf at `path`, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def hf_tensor(params: Params, entry: Entry) -> np.ndarray:
  """One HF tensor on the host (a single layer slice of a stacked parameter)."""
  x = get(params, entry.path)
  x = np.asarray(jax.device_get(x if entry.layer is None else x[entry.layer]))
  return np.ascontiguousarray(x.T if transposed(entry.path) else x)


def checked_cast(source: str, name: str, array: np.ndarray, dtype: Any) -> np.ndarray:
  """`array` cast to `dtype`; raises unless it holds finite floats, before and after the cast.

  Integer tensors are quantized weights (their scales elsewhere) or not weights at all: cast to float they would
  load as a wrong model without any error. A NaN or inf never belongs in a model, and a cast to float16 turns
  values beyond its range into inf.
  """
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ConversionError(f"{source}: tensor {name!r} has dtype {array.dtype}; only floating-point weights are "
                          "read (de-quantize integer or quantized checkpoints first)")
  bad = array.size - np.count_nonzero(np.isfinite(array))
  if bad:
    raise ConversionError(f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf)")
  with np.errstate(over="ignore"):  # reported below, naming the tensor
    cast = array.astype(dtype, copy=False)
  bad = 0 if cast is array else cast.size - np.count_nonzero(np.isfinite(cast))
  if bad:
    raise ConversionError(f"{source}: tensor {name!r} has {bad} value(s) beyond the range of {jnp.dtype(dtype)}; "
                          "use a wider dtype")
  return cast


def check_names(cfg: ModelConfig, available: Iterable[str], source: str) -> tuple[list[Entry], bool]:
  """(the entries the model needs, whether the checkpoint also stores a tied model's head); raises on a missing
  or unexpected tensor. A stored tied head must equal the embedding
  (`tied_copy_error` otherwise)."""
  wanted = entries(cfg)
  names = set(available)
  missing = [e.hf_name for e in wanted if e.hf_name not in names]
  if missing:
    raise ConversionError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
  extra = sorted(names - {e.hf_name for e in wanted})
  # Some tied checkpoints also store the head; it is accepted only when it really is the embedding matrix.
  tied_copy = extra == [TIED_HEAD] and cfg.tie_word_embeddings
  if extra and not tied_copy:
    raise ConversionError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all) "
                          f"for a {cfg.family} model")
  return wanted, tied_copy


def tied_copy_error(source: str) -> ConversionError:
  return ConversionError(f"{source}: tensor {TIED_HEAD!r} differs from {EMBEDDING!r} although tie_word_embeddings=True")


def check_shape(source: str, entry: Entry, shape: tuple[int, ...]) -> None:
  if tuple(shape) != entry.hf_shape:
    raise ConversionError(f"{source}: tensor {entry.hf_name!r} has shape {tuple(shape)}, expected {entry.hf_shape}")


def assemble(cfg: ModelConfig, available: Iterable[str], read: Callable[[str], np.ndarray],
             source: str) -> Params:
  """Builds the o1jax tree from HF-named tensors, reading one tensor at a time.

  Args:
    cfg: the architecture; tensors are cast to `cfg.param_dtype`.
    available: every tensor name the checkpoint holds (HF names).
    read: returns one tensor (HF layout) by name; `source` plus the name locate it in errors.
    source: what the tensors come from (a directory or file), for error messages.
  """
  wanted, tied_copy = check_names(cfg, available, source)
  if tied_copy and not np.array_equal(read(TIED_HEAD), read(EMBEDDING)):
    raise tied_copy_error(source)
  dtype = jnp.dtype(cfg.param_dtype)
  shapes = expected_shapes(cfg)
  params: Params = {}
  stacks: dict[tuple[str, ...], np.ndarray] = {}
  for e in wanted:
    array = read(e.hf_name)
    check_shape(source, e, array.shape)
    array = checked_cast(source, e.hf_name, array, dtype)
    array = array.T if transposed(e.path) else array
    if e.layer is None:
      put(params, e.path, jnp.asarray(array))
      continue
    if e.path not in stacks:
      stacks[e.path] = np.empty(get(shapes, e.path).shape, dtype)
    stacks[e.path][e.layer] = array
    if e.layer == cfg.num_hidden_layers - 1:
      put(params, e.path, jnp.asarray(stacks.pop(e.path)))
  return params


def check_tree(cfg: ModelConfig, params: Params) -> None:
  """Raises when `params` is not the tree `init_params(cfg)` would build (names and shapes)."""
  want = dict(_flatten(expected_shapes(cfg)))
  have = dict(_flatten(params))
  for path in sorted(set(want) | set(have)):
    if path not in have:
      raise ConversionError(f"parameter {'/'.join(path)} is missing from the tree")
    if path not in want:
      raise ConversionError(f"parameter {'/'.join(path)} is not part of a {cfg.family} model with this config")
    if tuple(have[path].shape) != tuple(want[path].shape):
      raise ConversionError(f"parameter {'/'.join(path)} has shape {tuple(have[path].shape)}, "
                            f"expected {tuple(want[path].shape)}")
