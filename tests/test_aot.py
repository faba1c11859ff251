"""Ahead-of-time fit report: slice names map to Cloud TPU's chip grids; the report compiles the real train and
encode steps and its numbers agree with things we did not write (the state's byte count, XLA's FLOP count at
depth 1 where no loop hides work, the TPU compiler's own out-of-memory verdict); exit 1 when a config cannot fit.

TPU cases need the optional libtpu package (requirements-tpu.txt) and run in subprocesses, so that loading the TPU
compiler never changes the backends of this test session; the cpu-N path runs on the session's 8 fake devices.
"""
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from o1jax.aot import fit, topology
from o1jax.aot.__main__ import main as aot_main

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = f"--config={ROOT / 'configs' / 'tiny_cpu.py'}"
# Depth 1: XLA's cost analysis counts a while-loop body once, so only a 1-layer scan makes its count comparable.
ONE_LAYER = "--config.model.arch.num_hidden_layers=1"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -r requirements-tpu.txt)")


@pytest.mark.parametrize("name, grid, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-64", "v5p:2x4x4", 32), ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-256", "v5p:4x4x8", 128), ("v4-32", "v4:2x2x4", 16), ("v5e-1", "v5e:1x1", 1), ("v5e-8", "v5e:2x4", 8),
    ("v5e-256", "v5e:16x16", 256), ("v6e-64", "v6e:8x8", 64), ("v5p:4x4x8", "v5p:4x4x8", 128),
])
def test_slice_names_map_to_cloud_tpu_grids(name, grid, chips):
  _, grid_name, count = topology.tpu_topology_name(name)
  assert (grid_name, count) == (grid, chips)


@pytest.mark.parametrize("name, message", [
    ("v5p-7", "multiple"), ("v5p-12", "power-of-two"), ("v5p-2", "at least 4 chips"), ("v7x-8", "known TPU"),
    ("v5e:2x2x2", "2 dimensions"), ("h100-8", "expected a slice name"),
])
def test_bad_topology_names(name, message):
  with pytest.raises(ValueError, match=message):
    topology.tpu_topology_name(name)


def check_report(report: dict, devices: int) -> None:
  """Fields and their arithmetic for tiny_cpu at depth 1 (16 queries x 4 passages, lengths 16 / 12)."""
  assert report["devices"] == devices and report["mesh"] == {"data": 1, "fsdp": devices, "tensor": 1}
  assert report["tokens_per_step"] == 16 * 16 + 64 * 12
  assert report["layers"] == 1 and report["finetune"] == "full"
  train, encode = report["steps"]["train_step"], report["steps"]["encode_step"]
  for step in (train, encode):
    assert step["total_bytes"] == (step["argument_bytes"] + step["output_bytes"] - step["alias_bytes"]
                                   + step["temp_bytes"] + step["code_bytes"])
    assert step["fits"] and not step["error"]
  # The state (fp32 parameters + two Adam moments) sharded over the devices, at most fully replicated.
  state_bytes = 3 * 4 * report["params"]
  assert state_bytes / devices <= train["argument_bytes"] <= state_bytes + 3 * report["tokens_per_step"] * 4
  assert train["alias_bytes"] > 0  # the donated state is updated in place
  # Model FLOPs (Trainer.flops_per_step) vs XLA's count of the compiled program: XLA also counts norms, softmax,
  # the loss and AdamW's elementwise work, a few percent at this width; no remat here.
  assert 0.95 < train["compiled_flops"] / report["analytic_flops_per_step"] < 1.2
  assert report["encode_rows"] == 64 and report["encode_length"] == fit.EVAL_DOC_LENGTH
  assert report["fits"]


def test_cpu_devices_report_and_exit_status(tmp_path, capsys):
  out = tmp_path / "report.json"
  assert aot_main([TINY, ONE_LAYER, "--topology=cpu-8", f"--json={out}"]) == 0
  report = json.loads(out.read_text())
  check_report(report, 8)
  text = capsys.readouterr().out
  assert "[train_step]" in text and "[encode_step]" in text and text.rstrip().endswith("FITS")
  # The same program against 1 MiB per device cannot fit.
  assert aot_main([TINY, ONE_LAYER, "--topology=cpu-8", "--hbm_gib=0.001", "--encode_rows=8",
                   "--encode_length=16"]) == 1
  assert "DOES NOT FIT" in capsys.readouterr().out


def test_cpu_topology_must_match_the_process():
  with pytest.raises(ValueError, match="this process has 8 CPU devices"):
    topology.resolve_topology("cpu-4")


def test_bad_config_exits_2(capsys):
  assert aot_main([TINY, "--topology=cpu-8", "--config.train.batch_queries=12"]) == 2
  assert "not divisible by the mesh" in capsys.readouterr().err


def subprocess_env() -> dict:
  """This environment without jax/XLA settings (a TPU process gets its own), this checkout first on the path."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "LIBTPU_"))}
  return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run_aot(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "o1jax.aot", *args], cwd=ROOT, capture_output=True, text=True,
                        env=subprocess_env(), timeout=600)


@needs_libtpu
def test_tpu_slice_devices_match_the_table():
  code = ("from o1jax.aot import topology\n"
          "for name in ('v5p-64', 'v5p-128', 'v5e-256', 'v4-8', 'v6e-8'):\n"
          "  t = topology.resolve_topology(name)\n"
          "  print(name, len(t.devices), t.chips, t.hbm_bytes_per_device / 2**30, t.devices[0].device_kind)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=subprocess_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {line.split()[0]: line.split(maxsplit=4)[1:] for line in proc.stdout.splitlines()}
  assert rows["v5p-64"] == ["32", "32", "95.0", "TPU v5"]
  assert rows["v5p-128"] == ["64", "64", "95.0", "TPU v5"]
  assert rows["v5e-256"] == ["256", "256", "16.0", "TPU v5 lite"]
  assert rows["v6e-8"] == ["8", "8", "32.0", "TPU v6 lite"]
  # v4 exposes one device per TensorCore here: the chip's 32 GiB is split between its two devices.
  assert rows["v4-8"][:3] == ["8", "4", "16.0"]


@needs_libtpu
def test_tpu_report_fits(tmp_path):
  out = tmp_path / "report.json"
  proc = run_aot(TINY, ONE_LAYER, "--topology=v5e-4", f"--json={out}")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  check_report(report, 4)
  assert report["topology"] == "v5e-4 (v5e:2x2, TPU v5 lite)" and report["chips"] == 4
  assert report["hbm_bytes_per_device"] == 16 * 2**30
  assert math.isclose(report["ideal_step_seconds"], report["analytic_flops_per_step"] / (4 * 197e12))
  assert "compiled FLOPs" in proc.stdout and proc.stdout.rstrip().endswith("FITS")


@needs_libtpu
def test_tpu_compiler_out_of_memory_exits_1(tmp_path):
  """2048-token sequences, 4352 of them, without remat: the attention scores alone need ~100 GiB per v5e chip."""
  out = tmp_path / "report.json"
  proc = run_aot(TINY, ONE_LAYER, "--topology=v5e-4", "--config.train.batch_queries=256",
                 "--config.train.group_size=16", "--config.train.lengths.doc=2048",
                 "--config.train.lengths.query_thought=2048", "--encode_rows=64", "--encode_length=64",
                 f"--json={out}")
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  train = json.loads(out.read_text())["steps"]["train_step"]
  assert not train["fits"] and "RESOURCE_EXHAUSTED" in train["error"]
  assert train["total_bytes"] > 16 * 2**30  # what the compiler says the program needs
  assert "DOES NOT FIT: the compiler ran out of memory" in proc.stdout


def test_libtpu_is_pinned_in_the_tpu_extra():
  lines = [l for l in (ROOT / "requirements-tpu.txt").read_text().splitlines() if l and not l.startswith("#")]
  assert lines == ["libtpu==0.0.42.1"]
  if HAS_LIBTPU:
    assert importlib.metadata.version("libtpu") == "0.0.42.1"
  assert jax.__version__ == "0.10.2"  # the jax whose [tpu] extra pins libtpu 0.0.42.*


def test_cpu_topology_is_one_slice(capsys):
  assert aot_main([TINY, "--topology=cpu-8", "--slices=2"]) == 2
  assert "several slices are TPU topologies" in capsys.readouterr().err


@needs_libtpu
def test_multi_slice_mesh_puts_the_data_axis_across_slices():
  """libtpu's two-slice v5p topology (devices with slice_index): data crosses the slices, fsdp stays in each."""
  code = ("from o1jax import sharding\n"
          "from o1jax.aot import topology\n"
          "devices = topology.resolve_topology('v5p-8', slices=2).devices\n"
          "for mesh_config in ({'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 2},\n"
          "                    {'data': 2, 'fsdp': -1, 'tensor': 1, 'dcn_data': 2}):\n"
          "  mesh = sharding.make_mesh(mesh_config, devices)\n"
          "  print(dict(mesh.shape), [[d.slice_index for d in row.flat] for row in mesh.devices])\n"
          "try:\n"
          "  sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 1}, devices)\n"
          "except ValueError as e:\n"
          "  print(e)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=subprocess_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "{'data': 2, 'fsdp': 4, 'tensor': 1} [[0, 0, 0, 0], [1, 1, 1, 1]]"
  assert lines[1] == "{'data': 4, 'fsdp': 2, 'tensor': 1} [[0, 0], [0, 0], [1, 1], [1, 1]]"
  assert lines[2] == "config.mesh.dcn_data=1, but the devices form 2 slices: set it to 2"


@needs_libtpu
def test_tpu_two_slices_report(tmp_path):
  """Compiled for two v5p-8 slices: per-chip memory with the state sharded 4 ways (fsdp within a slice) and
  replicated across the slices."""
  out = tmp_path / "report.json"
  proc = run_aot(TINY, ONE_LAYER, "--topology=v5p-8", "--slices=2", f"--json={out}")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["topology"] == "2 x v5p-8 (v5p:2x2x1, TPU v5)"
  assert (report["devices"], report["chips"], report["slices"], report["dcn_data"]) == (8, 8, 2, 2)
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert report["hbm_bytes_per_device"] == 95 * 2**30
  train = report["steps"]["train_step"]
  state_bytes = 3 * 4 * report["params"]
  assert state_bytes / 4 <= train["argument_bytes"] < state_bytes / 2  # sharded 4 ways, not 8, not replicated
  assert report["fits"] and 0.95 < train["compiled_flops"] / report["analytic_flops_per_step"] < 1.2
  assert "data over 2 slices (DCN) x 1 within each" in proc.stdout and proc.stdout.rstrip().endswith("FITS")


@needs_libtpu
def test_splash_attention_compiles_into_the_tpu_program_from_this_machine():
  """The model lowered for a v5e-4 slice (the mesh's platform, not this CPU's) carries the Mosaic kernel with
  attention=splash and none with the einsum; both compile with libtpu. Mistral-shaped heads (head_dim 128, 4 query
  heads per kv head, a 512-token window) at 1,024 tokens, batch and kv heads sharded."""
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from o1jax import sharding
from o1jax.aot import topology
from o1jax.model import Decoder, ModelConfig, init_params
devices = topology.resolve_topology("v5e-4").devices
mesh = Mesh(np.array(devices).reshape(2, 1, 2), sharding.MESH_AXES)
cfg = ModelConfig(family="mistral", vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=128, sliding_window=512, dtype="bfloat16")
params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), params)
rows = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=NamedSharding(mesh, P("data")))
for attention in ("einsum", "splash"):
  with sharding.activation_rules(mesh):
    lowered = jax.jit(lambda p, ids, mask: Decoder(cfg.replace(attention=attention)).apply(
        {"params": p}, ids, jnp.cumsum(mask, axis=1) - 1, mask)).lower(params, rows, rows)
  compiled = lowered.compile()
  print(attention, "tpu_custom_call" in lowered.as_text(), compiled.memory_analysis().temp_size_in_bytes)
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=subprocess_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  kernel = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()}
  assert kernel == {"einsum": "False", "splash": "True"}, proc.stdout


@needs_libtpu
def test_attention_comparison_reports_each_implementation(tmp_path):
  out = tmp_path / "report.json"
  proc = run_aot(TINY, ONE_LAYER, "--topology=v5e-4", "--encode_rows=8", "--encode_length=128",
                 "--attention=einsum,splash", f"--json={out}")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  reports = json.loads(out.read_text())
  assert list(reports) == ["einsum", "splash"] and all(r["fits"] for r in reports.values())
  table = proc.stdout[proc.stdout.index("attention   train_step total"):].splitlines()
  assert [line.split()[0] for line in table[1:]] == ["einsum", "splash"]
  for line, report in zip(table[1:], reports.values()):
    assert f"{report['steps']['encode_step']['total_bytes'] / 2**20:.2f} MiB" in line
  assert run_aot(TINY, "--topology=cpu-8", "--attention=flash").returncode == 2
