"""Weights loaded straight onto a mesh (`load_hf_sharded`), each process reading only its own devices' slices.

The judges are safetensors' own reader (`load_hf`, `safetensors.numpy.load_file`), transformers' tensors (for a
bfloat16 checkpoint, which `load_hf` cannot read) and the OS's count of the bytes a process read (`rchar` in
/proc/self/io: the loader reads with pread, so every byte it reads is counted there).

The e2e test runs this file as a worker in 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, fsdp over
all 8). Each process must read its own slices (half of every split tensor; every parameter but the norms is split
over fsdp) plus what every process reads whole: the replicated norms (0.08% of the bytes) and the metadata
(config.json, the shard index, each file's header: 4.9 KB here; the tolerance is 16 KiB, which also covers the
coordination service's socket reads, counted by rchar too). So each process reads between 1/2 and 0.51 of what one
process reads alone (observed 0.5007). The gathered parameters must equal `load_hf`'s bit for bit, and, after the
special tokens are added and the trainer's state is built from them, the host path's (the new rows to float32
summation order). A NaN that only one process reads fails both processes.
"""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from jax.experimental import multihost_utils

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_convert import tiny_tokenizer  # noqa: E402
from test_multiprocess import free_port, wait_all  # noqa: E402
from test_parity import save_tiny  # noqa: E402

from o1jax import sharding  # noqa: E402
from o1jax.convert import ConversionError, layout, load_hf  # noqa: E402
from o1jax.convert.hf import load_hf_sharded  # noqa: E402
from o1jax.convert.sliced import SafetensorsFile  # noqa: E402
from o1jax.model import ModelConfig  # noqa: E402
from o1jax.tokenizer import add_special_tokens, load_tokenizer  # noqa: E402
from o1jax.training import sources, state as state_lib  # noqa: E402
from o1jax.training.trainer import Trainer, TrainerSettings  # noqa: E402

# Big enough that tensor bytes (6.7 MB in float32) dwarf the metadata every process reads whole (< 16 KiB).
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
METADATA_SLACK = 16 * 2**10
# A ModelSource's arch: only its runtime options (float32 defaults) are read when weights are loaded.
RUNTIME = ModelConfig(family="llama", vocab_size=0, hidden_size=1, intermediate_size=1, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=1)
PROC_IO = 256  # reading /proc/self/io is itself a read of about 120 bytes


def rchar() -> int:
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def save_checkpoint(path: pathlib.Path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  """A Llama saved by transformers in 4 safetensors shards with an index, and a word-level tokenizer."""
  model = save_tiny(path, transformers.LlamaConfig, seed=seed, max_shard_size="2MB",
                    **{**MODEL, "tie_word_embeddings": False, **overrides})
  tiny_tokenizer(MODEL["vocab_size"]).save_pretrained(path)
  return model


def mesh_of(data: int, fsdp: int, tensor: int):
  return sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def load_on(path, mesh, **runtime):
  return load_hf_sharded(path, lambda cfg: state_lib.param_shardings(cfg, mesh), **runtime)


def measured_load(path, mesh) -> tuple[object, int, int]:
  """(params, bytes this process read, peak traced host memory) of a load after an unmeasured one: the first load
  imports modules and compiles the loader's collective (0.8 MB of reads that are not weights)."""
  load_on(path, mesh)
  tracemalloc.start()
  before = rchar()
  _, params = load_on(path, mesh)
  read = rchar() - before
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  return params, read, peak


def local_bytes(params, itemsize: int) -> int:
  """Bytes of the union of this process's device slices (distinct slices are disjoint blocks)."""
  total = 0
  for x in jax.tree.leaves(params):
    slices = {tuple(s.indices(d)[:2] for s, d in zip(index, x.shape))
              for index in x.sharding.addressable_devices_indices_map(x.shape).values()}
    total += sum(math.prod(b - a for a, b in s) for s in slices) * itemsize
  return total


def gathered(params):
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)


def assert_bitwise_equal(got, want):
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), jax.tree_util.keystr(path)


def assert_grown_params_equal(got, want, vocab: int = MODEL["vocab_size"]):
  """Bitwise, except the rows the special tokens added (embedding rows, LM head columns from MODEL's vocab_size on).

  Those are the mean of the existing rows in float32, which the mesh path sums shard by shard and the host path in
  one piece: the order differs, so the last bits may. Observed: 7e-10 absolute for the 1024-row test model, 6e-8
  (2e-7 relative, 1-2 ulp) for SmolLM2's 49152 rows; rtol 1e-6 + atol 1e-7 still tells any wrong row apart (rows
  differ by ~1e-2).
  """
  got, want = dict(got), dict(want)
  for key, axis in (("embed_tokens", 0), ("lm_head", 1)):
    if key not in want:  # a tied model has no head
      continue
    a, b = (np.asarray(jax.tree.leaves(tree.pop(key))[0]) for tree in (got, want))
    np.testing.assert_allclose(np.moveaxis(a, axis, 0)[vocab:], np.moveaxis(b, axis, 0)[vocab:], rtol=1e-6,
                               atol=1e-7)
    assert_bitwise_equal(np.moveaxis(a, axis, 0)[:vocab], np.moveaxis(b, axis, 0)[:vocab])
  assert_bitwise_equal(got, want)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  save_checkpoint(path)
  assert len(list(path.glob("model-*.safetensors"))) > 2
  return path


# ------------------------------------------------------------------------------------------------ the reader


def test_reader_reads_exactly_the_slice_and_nothing_else(tmp_path):
  rs = np.random.RandomState(0)
  tensors = {"cube": rs.randn(6, 10, 64).astype(np.float32), "matrix": rs.randn(90, 70).astype(np.float16)}
  safetensors.numpy.save_file(tensors, str(tmp_path / "a.safetensors"))
  bf16 = torch.randn(8, 5, dtype=torch.bfloat16)
  safetensors.torch.save_file({"bf16": bf16}, str(tmp_path / "b.safetensors"))
  cases = [("cube", ((1, 4), (0, 10), (0, 64))), ("cube", ((2, 3), (3, 7), (5, 6))),
           ("cube", ((0, 6), (2, 9), (0, 64))), ("matrix", ((0, 90), (20, 50))), ("matrix", ((40, 40), (0, 70))),
           ("cube", None)]
  with SafetensorsFile(tmp_path / "a.safetensors") as f:
    for name, bounds in cases:
      want = tensors[name] if bounds is None else tensors[name][tuple(slice(a, b) for a, b in bounds)]
      before = rchar()
      got = f.read(name, bounds)
      assert want.nbytes <= rchar() - before <= want.nbytes + PROC_IO, (name, bounds)
      assert got.dtype == want.dtype and np.array_equal(got, want), (name, bounds)
    with pytest.raises(ValueError, match="outside tensor 'matrix'"):
      f.read("matrix", ((0, 91), (0, 70)))
  with SafetensorsFile(tmp_path / "b.safetensors") as f:
    got = f.read("bf16", ((2, 6), (1, 4)))
    np.testing.assert_array_equal(got.astype(np.float32), bf16[2:6, 1:4].float().numpy())
  (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file" * 10)
  with pytest.raises(ConversionError, match=r"c\.safetensors: not a safetensors file"):
    SafetensorsFile(tmp_path / "c.safetensors")


# ------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2), (2, 2, 2)])
def test_sliced_load_equals_load_hf_bitwise(checkpoint, mesh_shape):
  mesh = mesh_of(*mesh_shape)
  cfg, want = load_hf(checkpoint)
  got, read, _ = measured_load(checkpoint, mesh)
  assert_bitwise_equal(got, want)
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(
      state_lib.param_shardings(cfg, mesh))))
  # One process holds every slice: each byte is read once, also where devices hold the same slice (data=2).
  tensor_bytes = sum(x.size * 4 for x in jax.tree.leaves(got))
  assert tensor_bytes <= read <= tensor_bytes + METADATA_SLACK, (read, tensor_bytes)


def test_tied_model_with_bias_and_a_stored_head_loads_like_load_hf(tmp_path):
  save_tiny(tmp_path, transformers.Qwen2Config, seed=3, tie_word_embeddings=True)
  file = tmp_path / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(file))
  safetensors.numpy.save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, str(file))
  _, want = load_hf(tmp_path, param_dtype="bfloat16")
  _, got = load_on(tmp_path, mesh_of(1, 4, 2), param_dtype="bfloat16")
  assert_bitwise_equal(got, want)

  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  tensors["lm_head.weight"][-1, -1] += 1
  safetensors.numpy.save_file(tensors, str(file))
  with pytest.raises(ConversionError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
    load_on(tmp_path, mesh_of(1, 8, 1))


def test_bfloat16_checkpoint_loads_the_tensors_transformers_saved(tmp_path):
  """`load_hf` cannot read bfloat16 safetensors (safetensors' numpy reader has no bfloat16); this loader can."""
  model = save_tiny(tmp_path / "f32", transformers.LlamaConfig, seed=4, tie_word_embeddings=False)
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  for param_dtype in ("bfloat16", "float32"):
    cfg, params = load_on(tmp_path / "bf16", mesh_of(1, 4, 2), param_dtype=param_dtype)
    host = jax.device_get(params)
    state = model.state_dict()
    for entry in layout.entries(cfg):
      want = state[entry.hf_name].float().numpy()
      got = layout.hf_tensor(host, entry)
      assert got.dtype == np.dtype(param_dtype) and np.array_equal(got.astype(np.float32), want), entry.hf_name


def _file_of(path: pathlib.Path, name: str) -> pathlib.Path:
  return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def _change(path: pathlib.Path, name: str, change) -> None:
  file = _file_of(path, name)
  tensors = safetensors.numpy.load_file(str(file))
  tensors[name] = change(tensors[name])
  safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def _nan(x):
  x[3, 5] = np.nan
  return x


def _nan_in_last_column(x):
  x[0, -1] = np.nan
  return x


def _truncate(path: pathlib.Path, name: str) -> None:
  file = _file_of(path, name)
  file.write_bytes(file.read_bytes()[:-100])


@pytest.mark.parametrize("name, damage, message", [
    ("model.layers.1.mlp.up_proj.weight", lambda p, n: _change(p, n, _nan), "has 1 non-finite value"),
    ("model.layers.0.self_attn.q_proj.weight", lambda p, n: _change(p, n, lambda x: x.astype(np.int8)),
     "has dtype int8; only floating-point weights are read"),
    ("model.norm.weight", _truncate, "(truncated or corrupt?)"),
], ids=["nan", "int8", "truncated"])
def test_bad_weights_fail_naming_the_file_and_tensor(tmp_path, name, damage, message):
  save_tiny(tmp_path, transformers.LlamaConfig, seed=5, max_shard_size="40KB", tie_word_embeddings=False)
  damage(tmp_path, name)
  with pytest.raises(ConversionError) as error:
    load_on(tmp_path, mesh_of(1, 8, 1))
  where = str(tmp_path) if damage is not _truncate else str(_file_of(tmp_path, name))
  assert str(error.value).startswith(f"{where}: tensor {name!r} ") and message in str(error.value), error.value


def host_reference(path):
  """What a run without a mesh builds: `load_hf`, then the special tokens added on the host."""
  cfg, params = load_hf(path)
  return add_special_tokens(load_tokenizer(path), cfg, params)


def test_build_model_on_a_mesh_gives_the_trainer_the_host_path_state(checkpoint):
  mesh = mesh_of(1, 8, 1)
  model = sources.ModelSource("hf", str(checkpoint), RUNTIME)
  data = sources.DataSource("synthetic")
  cfg, params, _, special = sources.build_model(model, data, mesh)
  want_cfg, want_params, want_special = host_reference(checkpoint)
  assert (cfg, special) == (want_cfg, want_special) and cfg.vocab_size == MODEL["vocab_size"] + 4
  trainer = Trainer(cfg, TrainerSettings(steps=1), mesh, special)
  targets = jax.tree.leaves(trainer.state_shardings["params"])
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(params), targets))
  state = jax.device_get(trainer.init_state(jax.random.key(0), params))
  from_host = jax.device_get(trainer.init_state(jax.random.key(0), want_params))
  assert_grown_params_equal(state.pop("params"), want_params)
  assert_grown_params_equal(from_host.pop("params"), want_params)
  assert_bitwise_equal(state, from_host)


def test_gguf_is_read_whole_and_placed_like_the_host_path(smollm2_gguf):
  """GGUF files are not sliced (quantized blocks): every process reads the file, then keeps only its shards."""
  mesh = mesh_of(1, 4, 2)
  model = sources.ModelSource("gguf", str(smollm2_gguf), RUNTIME)
  cfg, params, _, special = sources.build_model(model, sources.DataSource("synthetic"), mesh)
  want_cfg, want_params, _, want_special = sources.build_model(model, sources.DataSource("synthetic"))
  assert (cfg, special) == (want_cfg, want_special)
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(
      state_lib.param_shardings(cfg, mesh))))
  assert_grown_params_equal(jax.device_get(params), want_params, vocab=cfg.vocab_size - 4)


# ------------------------------------------------------------------------------------------ two processes


def worker(path: str, damaged: str, out: str) -> None:
  """One process of the pair: measures its sliced load, then checks it and the trainer path against load_hf, then
  loads `damaged` (a NaN in the embedding's last column) and records the error."""
  sharding.initialize_distributed()
  mesh = mesh_of(1, -1, 1)
  params, read, peak = measured_load(path, mesh)
  result = {"process": jax.process_index(), "devices": jax.local_device_count(), "read": read,
            "expected": local_bytes(params, 4), "total": sum(x.size * 4 for x in jax.tree.leaves(params)), "peak": peak}
  _, want = load_hf(path)
  assert_bitwise_equal(gathered(params), want)

  model = sources.ModelSource("hf", path, RUNTIME)
  cfg, params, _, special = sources.build_model(model, sources.DataSource("synthetic"), mesh)
  want_cfg, want_params, want_special = host_reference(path)
  assert (cfg, special) == (want_cfg, want_special)
  state = Trainer(cfg, TrainerSettings(steps=1), mesh, special).init_state(jax.random.key(0), params)
  assert_grown_params_equal(gathered(state["params"]), want_params)

  embedding = state_lib.param_shardings(cfg, mesh)["embed_tokens"]["embedding"]
  result["holds_nan"] = any(index[1].indices(cfg.hidden_size)[1] == cfg.hidden_size
                            for index in embedding.addressable_devices_indices_map((1, cfg.hidden_size)).values())
  with pytest.raises(ConversionError) as error:
    load_on(damaged, mesh)
  result["error"] = str(error.value)
  pathlib.Path(out).write_text(json.dumps(result))


@pytest.mark.e2e
def test_two_processes_each_read_half_and_load_what_one_process_loads(checkpoint, tmp_path):
  params, single, single_peak = measured_load(checkpoint, mesh_of(1, 8, 1))
  tensor_bytes = local_bytes(params, 4)

  damaged = tmp_path / "damaged"
  shutil.copytree(checkpoint, damaged)
  _change(damaged, layout.EMBEDDING, _nan_in_last_column)
  port = free_port()
  procs = []
  for index in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
    log = open(tmp_path / f"worker.{index}.log", "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, __file__, str(checkpoint), str(damaged),
                                   str(tmp_path / f"{index}.json")],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  wait_all(procs, tmp_path, "worker")
  results = [json.loads((tmp_path / f"{index}.json").read_text()) for index in range(2)]
  for r in results:
    assert r["devices"] == 4 and r["total"] == tensor_bytes
    # The OS count is the process's own slices plus the metadata every process reads (config, index, headers).
    assert r["expected"] <= r["read"] <= r["expected"] + METADATA_SLACK, r
    # Half the split tensors plus the whole replicated norms (0.08% of the bytes) and the metadata.
    assert 0.5 <= r["read"] / single <= 0.51, (r["read"], single)
    assert r["peak"] < 0.75 * single_peak, (r["peak"], single_peak)
  # A fault only one process can see (a value in its slices) fails both, each naming the cause it knows.
  holder = next(r["process"] for r in results if r["holds_nan"])
  assert [r["holds_nan"] for r in results].count(True) == 1
  for r in results:
    want = (f"{damaged}: tensor {layout.EMBEDDING!r} has 1 non-finite value" if r["holds_nan"] else
            f"{damaged}: process {holder} could not load its slices of the weights")
    assert r["error"].startswith(want), r["error"]
  print(f"bytes read: one process {single:,}; each of two {[r['read'] for r in results]}; traced host peak: "
        f"{single_peak:,} vs {[r['peak'] for r in results]}")


if __name__ == "__main__":
  worker(*sys.argv[1:])
