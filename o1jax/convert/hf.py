"""Hugging Face directories (config.json + safetensors) to o1jax parameters and back.

Import reads one tensor at a time with `safe_open` (single file or sharded with `model.safetensors.index.json`);
`load_hf_sharded` builds the parameters on a mesh instead, each process reading only its devices' slices.
Export writes one tensor at a time (one layer slice of a stacked parameter), so a large model is never held twice
in host memory, into a temporary directory that is renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers

from o1jax.convert import layout, sharded, sliced
from o1jax.convert.layout import ConversionError, Params
from o1jax.files import publish_directory
from o1jax.model import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def read_config(model_dir: str | os.PathLike, **runtime) -> ModelConfig:
  """The ModelConfig of a Hugging Face directory; `runtime` sets its runtime fields (dtype, ...)."""
  path = pathlib.Path(model_dir) / "config.json"
  try:
    hf = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: cannot read the model config: {e}") from e
  try:
    return ModelConfig.from_hf_dict(hf, **runtime)
  except KeyError as e:
    raise ConversionError(f"{path}: required field {e} is missing") from e
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from e


def _weight_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> safetensors file, from the shard index or the single file."""
  index = model_dir / INDEX_FILE
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ConversionError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
    return {name: model_dir / file for name, file in weight_map.items()}
  single = model_dir / SINGLE_FILE
  if not single.exists():
    raise ConversionError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are loaded)")
  with _open(single) as f:
    return {name: single for name in f.keys()}


def _open(file: pathlib.Path):
  try:
    return safetensors.safe_open(str(file), framework="numpy")
  except (OSError, safetensors.SafetensorError) as e:
    raise ConversionError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from e


def _check_listed(files: dict[str, pathlib.Path], handles: dict[pathlib.Path, Any]) -> None:
  """Raises when the shard index lists a tensor in a file that lacks it."""
  for file, handle in handles.items():
    held = set(handle.keys())
    absent = sorted(name for name, f in files.items() if f == file and name not in held)
    if absent:
      raise ConversionError(f"{file}: tensor {absent[0]!r} is listed in {INDEX_FILE} but not in the file")


def load_hf(model_dir: str | os.PathLike, **runtime) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face Llama / Mistral / Qwen2 directory as (ModelConfig, params).

  Args:
    model_dir: directory with config.json and safetensors weights.
    **runtime: ModelConfig runtime options (dtype, param_dtype, remat_policy, attention, unroll_layers); params
      are cast to param_dtype.
  """
  model_dir = pathlib.Path(model_dir)
  cfg = read_config(model_dir, **runtime)
  files = _weight_files(model_dir)
  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(_open(file)) for file in sorted(set(files.values()))}
    _check_listed(files, handles)

    def read(name: str) -> np.ndarray:
      try:
        return handles[files[name]].get_tensor(name)
      except safetensors.SafetensorError as e:
        raise ConversionError(f"{files[name]}: cannot read tensor {name!r}: {e}") from e

    params = layout.assemble(cfg, files, read, str(model_dir))
  return cfg, params


def load_hf_sharded(model_dir: str | os.PathLike, shardings: Callable[[ModelConfig], Params],
                    **runtime) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face directory straight onto a mesh: `load_hf`'s parameters, bit for bit, as global arrays.

  Each process reads only the slices of the safetensors tensors that its own devices hold (`sharded`), so host
  memory and bytes read per process fall with the number of processes. Every process must call this.

  Args:
    model_dir: directory with config.json and safetensors weights.
    shardings: the ModelConfig -> a Sharding per parameter (e.g. `o1jax.training.state.param_shardings`).
    **runtime: as for `load_hf`.
  """
  model_dir = pathlib.Path(model_dir)
  cfg = read_config(model_dir, **runtime)
  files = _weight_files(model_dir)
  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(sliced.SafetensorsFile(file)) for file in sorted(set(files.values()))}
    _check_listed(files, handles)
    params = sharded.assemble_sharded(cfg, {name: handles[file] for name, file in files.items()}, shardings(cfg),
                                      str(model_dir))
    read = sum(h.bytes_read for h in handles.values())
  total = sum(f.stat().st_size for f in handles)
  logging.info("%s: this process read %.1f MiB of %.1f MiB of weights", model_dir, read / 2**20, total / 2**20)
  return cfg, params


def _plan_shards(entries: list[layout.Entry], itemsize: int, max_shard_bytes: int) -> list[list[layout.Entry]]:
  shards: list[list[layout.Entry]] = [[]]
  size = 0
  for e in entries:
    nbytes = int(np.prod(e.hf_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  return shards


def _write_weights(cfg: ModelConfig, params: Params, out: pathlib.Path, max_shard_bytes: int,
                   source: str) -> None:
  dtype = jnp.dtype(cfg.param_dtype)
  entries = layout.entries(cfg)
  shards = _plan_shards(entries, dtype.itemsize, max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for name, shard in zip(names, shards):
    tensors = {e.hf_name: layout.checked_cast(source, e.hf_name, layout.hf_tensor(params, e), dtype)
               for e in shard}
    safetensors.numpy.save_file(tensors, str(out / name), metadata={"format": "pt"})
    # safetensors creates its files owner-only; the rest of the export is world-readable like save_pretrained's.
    (out / name).chmod(0o644)
    weight_map.update({e.hf_name: name for e in shard})
    del tensors
  if len(shards) > 1:
    total = sum(int(np.prod(e.hf_shape)) * dtype.itemsize for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_hf(cfg: ModelConfig, params: Params, out_dir: str | os.PathLike, tokenizer: Any = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> pathlib.Path:
  """Exports params as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads.

  Tensors are written in `cfg.param_dtype` (pass `cfg.replace(param_dtype=...)` to cast). Tied models get no
  `lm_head.weight`. The directory appears only once complete (written under a temporary name, then renamed).

  Args:
    cfg: the architecture of `params`.
    params: o1jax parameter tree (jax or numpy arrays, possibly sharded).
    out_dir: destination directory; must not exist unless `overwrite`.
    tokenizer: a transformers tokenizer to save alongside, or None.
    max_shard_bytes: weights above this size are split into shards with an index.
    overwrite: replace an existing `out_dir`.
  """
  out = pathlib.Path(out_dir)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
  layout.check_tree(cfg, params)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    transformers.GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    ).save_pretrained(tmp)
    _write_weights(cfg, params, tmp, max_shard_bytes, f"export to {out}")
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    publish_directory(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
