"""Ahead-of-time fit report: compile the real training and encode steps for a TPU slice on a CPU machine.

  python -m o1jax.aot --config=configs/mistral7b.py[:full] --topology=v5p-128 [--config.a.b=v ...]

Nothing runs and no weights or data are read: the model's shape comes from `config.model.arch`, the state and
batch are ShapeDtypeStructs carrying their shardings on a mesh of the slice's devices, and XLA's TPU compiler (the
optional `libtpu` package, requirements-tpu.txt) compiles exactly the program a pod would run. The report gives
per-device memory (arguments, outputs, temporaries, total vs the chip's HBM), compiled FLOPs vs the trainer's
analytic count, and tokens per step. Exit status 1 when either step does not fit (or the compiler runs out of
memory), 2 on a bad command line or config.

Topologies: Cloud TPU slice names (`v4-128`, `v5p-128`: TensorCores, 2 per chip; `v5e-256`, `v6e-64`: chips),
an explicit `v5p:4x4x4` chip grid, or `cpu-N` (N fake CPU devices of this machine, memory per device against
`--hbm_gib`, default the host's RAM split over the devices) for machines without libtpu.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from o1jax import config as o1config, sharding, train
from o1jax.tokenizer import SPECIAL_TOKENS, SpecialIds
from o1jax.train_step import QUERY_FIELDS, Trainer

GIB = 1024**3
# Documents are embedded at the evaluation length (METHOD §2), longer than the training length.
EVAL_DOC_LENGTH = 512


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: how slice names count it, its HBM and its dense bf16 peak (published figures)."""
  generation: str
  grid_dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  cores_per_chip_in_name: int  # v4-N and v5p-N count TensorCores (2 per chip); v5e-N and v6e-N count chips
  hbm_gib: float
  peak_tflops: float


CHIPS = {
    "v4": Chip("v4", 3, 2, 32, 275),
    "v5p": Chip("v5p", 3, 2, 95, 459),
    "v5e": Chip("v5e", 2, 1, 16, 197),
    "v6e": Chip("v6e", 2, 1, 32, 918),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A set of (possibly unattached) devices to compile for, and the memory each one has."""
  name: str
  devices: tuple[Any, ...]
  chips: int
  hbm_bytes_per_device: float
  peak_flops_per_chip: float | None  # None on CPU (no meaningful published peak)


def chip_grid(chip: Chip, chips: int) -> tuple[int, ...]:
  """The chip grid Cloud TPU uses for a slice of `chips` chips: powers of two as even as possible, the larger
  exponents last (v5p-64 = 32 chips = 2x4x4, v5e-256 = 16x16); the 4-chip 3-D slice is 2x2x1."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: slices of {chip.generation} have a power-of-two chip count")
  if chip.grid_dims == 3 and chips == 4:
    return (2, 2, 1)
  if chip.grid_dims == 3 and chips < 4:
    raise ValueError(f"{chip.generation} slices have at least 4 chips ({chip.generation}-"
                     f"{4 * chip.cores_per_chip_in_name}); got {chips}")
  exponent = chips.bit_length() - 1
  base, extra = divmod(exponent, chip.grid_dims)
  return tuple(2**(base + (i >= chip.grid_dims - extra)) for i in range(chip.grid_dims))


def tpu_topology_name(name: str) -> tuple[Chip, str, int]:
  """(chip, `generation:AxBxC` name for get_topology_desc, chip count) of a slice name or an explicit grid."""
  explicit = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name)
  named = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  generation = (explicit or named).group(1) if (explicit or named) else None
  if generation not in CHIPS:
    raise ValueError(f"--topology={name!r}: expected a slice name like v5p-128, v5e-256, v4-64, v6e-64, a grid like "
                     f"v5p:4x4x4, or cpu-N; known TPU generations: {', '.join(CHIPS)}")
  chip = CHIPS[generation]
  if explicit:
    grid = tuple(int(d) for d in explicit.group(2).split("x"))
    if len(grid) != chip.grid_dims:
      raise ValueError(f"--topology={name!r}: {generation} grids have {chip.grid_dims} dimensions")
  else:
    count = int(named.group(2))
    if count % chip.cores_per_chip_in_name:
      raise ValueError(f"--topology={name!r}: {generation}-N counts TensorCores, {chip.cores_per_chip_in_name} "
                       "per chip; N must be a multiple of that")
    grid = chip_grid(chip, count // chip.cores_per_chip_in_name)
  return chip, f"{generation}:{'x'.join(map(str, grid))}", math.prod(grid)


def resolve_topology(name: str, hbm_gib: float | None = None) -> Topology:
  """Devices to compile for. TPU names need the `libtpu` package; `cpu-N` uses this machine's CPU devices."""
  cpu = re.fullmatch(r"cpu-(\d+)", name)
  if cpu:
    count = int(cpu.group(1))
    devices = jax.devices("cpu")
    if len(devices) != count:
      raise ValueError(f"--topology={name}: this process has {len(devices)} CPU devices (set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax starts)")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_device = hbm_gib * GIB if hbm_gib else host / count
    return Topology(name, tuple(devices), count, per_device, None)
  chip, grid_name, chips = tpu_topology_name(name)
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ValueError(f"--topology={name}: compiling for TPU needs the libtpu package "
                     "(pip install -r requirements-tpu.txt); or use --topology=cpu-N") from e
  if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    # No TPU attached, so nothing to guard: without this, libtpu's /tmp lockfile lets only one process on the
    # machine compile for TPU at a time.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=grid_name).devices)
  # Some generations expose one device per TensorCore (v4 without megacore): HBM is split between them.
  per_device = (hbm_gib or chip.hbm_gib) * GIB * chips / len(devices)
  return Topology(f"{name} ({grid_name}, {devices[0].device_kind})", devices, chips, per_device,
                  chip.peak_tflops * 1e12)


def shape_only_validate(config: Any, device_count: int) -> None:
  """`o1config.validate` minus its path checks: AOT compiles from shapes, so weights and data need not exist here."""
  try:
    o1config.validate(config, device_count)
  except o1config.ConfigError as e:
    problems = [line.strip() for line in str(e).splitlines()[1:]]
    problems = [p for p in problems if not p.startswith(("config.model.path=", "config.data.train_files"))]
    if problems:
      raise o1config.ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


def shape_only_trainer(config: Any, mesh: jax.sharding.Mesh) -> Trainer:
  """The trainer a real run of `config` would build, without reading weights.

  source 'random' builds its generated tokenizer exactly as training does. For checkpoints, the model comes from
  `config.model.arch`, whose vocab_size is taken as the tokenizer's size: add_special_tokens appends the four
  special tokens after it, as a real run does for a tokenizer that lacks them.
  """
  if config.model.source == "random":
    model_cfg, _, _, special = train.build_model(config)
    return Trainer(model_cfg, config, mesh, special)
  vocab = int(config.model.arch.vocab_size)
  if not vocab:
    raise ValueError("config.model.arch.vocab_size=0: AOT compilation needs the checkpoint's vocabulary size")
  model_cfg = o1config.model_config(config).replace(vocab_size=vocab + len(SPECIAL_TOKENS))
  eos = model_cfg.eos_token_ids[0] if model_cfg.eos_token_ids else 0
  special = SpecialIds(query=vocab, query_end=vocab + 1, thought=vocab + 2, emb=vocab + 3, eos=eos,
                       bos=model_cfg.bos_token_id, pad=eos)
  return Trainer(model_cfg, config, mesh, special)


def abstract_state(trainer: Trainer) -> Any:
  """The training state as ShapeDtypeStructs carrying their shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.abstract_state,
                      trainer.state_shardings)


def abstract_batch(config: Any, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """One global training batch of `config` (the trainer's batch contract) as sharded ShapeDtypeStructs."""
  t, shard = config.train, sharding.batch_sharding(mesh)
  q, docs = t.batch_queries, t.batch_queries * t.group_size
  batch = {name: jax.ShapeDtypeStruct((q, t.lengths.query_thought), np.int32, sharding=shard)
           for name in QUERY_FIELDS}
  for name in ("doc_ids", "doc_mask"):
    batch[name] = jax.ShapeDtypeStruct((docs, t.lengths.doc), np.int32, sharding=shard)
  if t.w_distill > 0:
    batch["teacher_scores"] = jax.ShapeDtypeStruct((q, t.group_size), np.float32, sharding=shard)
  return batch


@dataclasses.dataclass
class StepReport:
  """What the compiler says about one program, per device."""
  name: str
  fits: bool
  compile_seconds: float
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  total_bytes: int = 0
  compiled_flops: float = 0.0  # summed over devices
  error: str = ""


def _out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def compile_report(name: str, lower, hbm_bytes: float, devices: int) -> StepReport:
  """Compiles `lower()` and reads its memory and cost analyses; an out-of-memory compile error is a report that
  does not fit (any other error propagates)."""
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e):
      raise
    message = str(e).strip().splitlines()[0][:400]
    # The TPU compiler states what the program needs: "... required for HLO temporaries (135.00G) exceeds ...".
    required = re.search(r"\(([\d.]+)([KMG])\) exceeds available", message)
    total = int(float(required.group(1)) * 1024**("KMG".index(required.group(2)) + 1)) if required else 0
    return StepReport(name, False, time.perf_counter() - start, total_bytes=total, error=message)
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return StepReport(name, total <= hbm_bytes, seconds, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                    mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, total,
                    float((cost or {}).get("flops", 0.0)) * devices)


def fit_report(config: Any, topology: Topology, encode_rows: int | None = None,
               encode_length: int = EVAL_DOC_LENGTH) -> dict[str, Any]:
  """Compiles the train step and the encode step of `config` for `topology`; a JSON-ready report."""
  n = len(topology.devices)
  shape_only_validate(config, n)
  mesh = sharding.make_mesh(config.mesh, devices=topology.devices)
  trainer = shape_only_trainer(config, mesh)
  state, batch = abstract_state(trainer), abstract_batch(config, mesh)
  t = config.train
  encode_rows = encode_rows or t.batch_queries * t.group_size
  shard = sharding.batch_sharding(mesh)
  encode_batch = [jax.ShapeDtypeStruct((encode_rows, encode_length), np.int32, sharding=shard)] * 2
  trainable = {k: state[k] for k in ("params", "lora") if k in state}

  def lower_encode():
    # The encode step is Trainer.embed's jitted body; Trainer has no public lowering for it yet.
    with trainer._context():  # pylint: disable=protected-access
      return trainer._embed.lower(trainable, *encode_batch)  # pylint: disable=protected-access

  steps = (compile_report("train_step", lambda: trainer.lower_step(state, batch), topology.hbm_bytes_per_device, n),
           compile_report("encode_step", lower_encode, topology.hbm_bytes_per_device, n))
  analytic = trainer.flops_per_step({k: v.shape for k, v in batch.items()})
  tokens = sum(math.prod(v.shape) for k, v in batch.items() if k.endswith("_ids"))
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
  lora_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state.get("lora", {})))
  peak = topology.peak_flops_per_chip
  return {
      "topology": topology.name, "devices": n, "chips": topology.chips,
      "hbm_bytes_per_device": topology.hbm_bytes_per_device, "mesh": dict(mesh.shape),
      "finetune": t.finetune, "remat_policy": config.model.remat_policy, "dtype": config.model.dtype,
      "param_dtype": config.model.param_dtype, "layers": trainer.model_cfg.num_hidden_layers,
      "params": params, "lora_params": lora_params,
      "batch_queries": t.batch_queries, "group_size": t.group_size, "grad_accum_steps": t.grad_accum_steps,
      "gradcache_chunk": t.gradcache_chunk, "lengths": dict(t.lengths), "tokens_per_step": tokens,
      "analytic_flops_per_step": analytic,
      # Step time if every chip ran the analytic FLOPs at its dense bf16 peak: the 100%-MFU bound.
      "ideal_step_seconds": analytic / (peak * topology.chips) if peak else None,
      "encode_rows": encode_rows, "encode_length": encode_length,
      "steps": {r.name: dataclasses.asdict(r) for r in steps},
      "fits": all(r.fits for r in steps),
  }


def _size(x: float) -> str:
  return f"{x / GIB:8.2f} GiB" if abs(x) >= GIB / 10 else f"{x / 1024**2:8.2f} MiB"


def format_report(report: dict[str, Any]) -> str:
  """The human-readable report (one value per line, names matching the JSON keys)."""
  lines = [
      f"topology        {report['topology']}: {report['devices']} devices, {report['chips']} chips, "
      f"{report['hbm_bytes_per_device'] / GIB:.2f} GiB per device",
      f"mesh            {report['mesh']}",
      f"model           {report['layers']} layers, {report['params']:,} parameters ({report['param_dtype']} at "
      f"rest, {report['dtype']} compute), finetune={report['finetune']}"
      + (f" ({report['lora_params']:,} LoRA parameters)" if report["lora_params"] else "")
      + f", remat={report['remat_policy']}",
      f"batch           {report['batch_queries']} queries x {report['group_size']} passages, lengths "
      f"{report['lengths']}, grad_accum_steps={report['grad_accum_steps']}, "
      f"gradcache_chunk={report['gradcache_chunk']}",
      f"tokens/step     {report['tokens_per_step']:,}",
      f"analytic FLOPs  {report['analytic_flops_per_step']:.4g} per step (model FLOPs, Trainer.flops_per_step)",
  ]
  if report["ideal_step_seconds"]:
    lines.append(f"ideal step      {report['ideal_step_seconds'] * 1e3:.3g} ms at 100% of the chips' bf16 peak")
  for name, step in report["steps"].items():
    head = f"[{name}]" + (f" {report['encode_rows']} rows x {report['encode_length']} tokens"
                          if name == "encode_step" else "")
    lines.append(f"{head}  compiled in {step['compile_seconds']:.1f} s")
    if step["error"]:
      lines.append(f"  DOES NOT FIT: the compiler ran out of memory: {step['error']}")
      continue
    for key in ("argument", "output", "alias", "temp", "code"):
      lines.append(f"  {key + ' bytes':16s}{_size(step[key + '_bytes'])} per device")
    verdict = "fits" if step["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':16s}{_size(step['total_bytes'])} per device of {_size(report['hbm_bytes_per_device'])}"
                 f" ({step['total_bytes'] / report['hbm_bytes_per_device']:.0%}): {verdict}")
    if name == "train_step" and step["compiled_flops"]:
      lines.append(f"  compiled FLOPs  {step['compiled_flops']:.4g} per step (all devices), "
                   f"{step['compiled_flops'] / report['analytic_flops_per_step']:.3f} x analytic")
  lines.append("FITS" if report["fits"] else "DOES NOT FIT")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m o1jax.aot", description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", required=True, help="v5p-128, v5e-256, v4-64, v6e-64, v5p:4x4x4 or cpu-N")
  parser.add_argument("--hbm_gib", type=float, default=None, help="memory per chip (cpu-N: per device) to check "
                      "against, instead of the table / host RAM")
  parser.add_argument("--encode_rows", type=int, default=None,
                      help="rows of the encode step (default: the training batch's passages)")
  parser.add_argument("--encode_length", type=int, default=EVAL_DOC_LENGTH, help="tokens per encoded row")
  parser.add_argument("--json", default="", help="also write the report as JSON to this path")
  args, config_argv = parser.parse_known_args(argv)
  cpu = re.fullmatch(r"cpu-(\d+)", args.topology)
  if cpu and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    try:
      jax.config.update("jax_num_cpu_devices", int(cpu.group(1)))
    except RuntimeError:
      pass  # jax already started in this process: resolve_topology reports a device count that differs
  try:
    config = o1config.load(config_argv)
    topology = resolve_topology(args.topology, args.hbm_gib)
    report = fit_report(config, topology, args.encode_rows, args.encode_length)
  except ValueError as e:  # ConfigError included
    print(f"o1jax.aot: {e}", file=sys.stderr)
    return 2
  print(format_report(report))
  if args.json:
    tmp = f"{args.json}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, args.json)
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
