"""The fit report: the real training and encode steps compiled for a topology, their memory and FLOPs per device.

Nothing runs and no weights or data are read: the model's shape comes from `config.model.arch`, the state and
batch are ShapeDtypeStructs carrying their shardings on a mesh of the topology's devices.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import numpy as np

from o1jax import config as o1config, sharding
from o1jax.aot.topology import GIB, Topology
from o1jax.retrieval.embedder import embed_rows
from o1jax.training.trainer import shape_only_trainer

# Documents are embedded at the evaluation length (METHOD §2), longer than the training length.
EVAL_DOC_LENGTH = 512


def shape_only_validate(config: Any, device_count: int) -> None:
  """`o1config.validate` minus its path checks: AOT compiles from shapes, so weights and data need not exist here."""
  try:
    o1config.validate(config, device_count)
  except o1config.ConfigError as e:
    problems = [line.strip() for line in str(e).splitlines()[1:]]
    problems = [p for p in problems if not p.startswith(("config.model.path=", "config.data.train_files"))]
    if problems:
      raise o1config.ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


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
  run = o1config.settings(config)
  mesh = sharding.make_mesh(config.mesh, devices=topology.devices)
  trainer = shape_only_trainer(run.model, run.data, run.trainer, mesh)
  state, shape = trainer.abstract_state_with_shardings(), run.batch.shape()
  batch = shape.abstract(mesh)
  t = config.train
  encode_rows = encode_rows or t.batch_queries * t.group_size
  shard = sharding.batch_sharding(mesh)
  encode_batch = [jax.ShapeDtypeStruct((encode_rows, encode_length), np.int32, sharding=shard)] * 2
  # Inference runs the merged model (LoRA folded into the kernels): the parameters as they rest in training.
  inference_params = state["params"]

  def lower_encode():
    with sharding.activation_rules(mesh):
      return embed_rows.lower(inference_params, *encode_batch, cfg=trainer.model_cfg)

  steps = (compile_report("train_step", lambda: trainer.lower_step(state, batch), topology.hbm_bytes_per_device, n),
           compile_report("encode_step", lower_encode, topology.hbm_bytes_per_device, n))
  analytic = trainer.flops_per_step(shape)
  tokens = shape.tokens()
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
  lora_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state.get("lora", {})))
  peak = topology.peak_flops_per_chip
  return {
      "topology": topology.name, "devices": n, "chips": topology.chips, "slices": topology.slices,
      "hbm_bytes_per_device": topology.hbm_bytes_per_device, "mesh": dict(mesh.shape),
      "dcn_data": sharding.dcn_data(config.mesh),
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
      f"mesh            {report['mesh']}" + (f", data over {report['dcn_data']} slices (DCN) x "
                                                 f"{report['mesh']['data'] // report['dcn_data']} within each"
                                                 if report["dcn_data"] > 1 else ""),
      f"model           {report['layers']} layers, {report['params']:,} parameters ({report['param_dtype']} at "
      f"rest, {report['dtype']} compute), finetune={report['finetune']}"
      + (f" ({report['lora_params']:,} LoRA parameters)" if report["lora_params"] else "")
      + f", remat={report['remat_policy']}",
      f"batch           {report['batch_queries']} queries x {report['group_size']} passages, lengths "
      f"{report['lengths']}, grad_accum_steps={report['grad_accum_steps']}, "
      f"gradcache_chunk={report['gradcache_chunk']}",
      f"tokens/step     {report['tokens_per_step']:,}",
      f"analytic FLOPs  {report['analytic_flops_per_step']:.4g} per step (model FLOPs, o1jax.training.flops.step_flops)",
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


def format_comparison(reports: dict[str, dict[str, Any]]) -> str:
  """Per-device memory of each step under each attention implementation (`reports`: implementation -> report)."""
  first = next(iter(reports.values()))
  lines = [f"attention   train_step total   encode_step total ({first['encode_rows']} rows x "
           f"{first['encode_length']} tokens), per device of {_size(first['hbm_bytes_per_device']).strip()}"]
  for implementation, report in reports.items():
    cells = []
    for name in ("train_step", "encode_step"):
      step = report["steps"][name]
      if step["error"] and not step["total_bytes"]:
        cells.append("compiler out of memory")
      else:
        cells.append(_size(step["total_bytes"]) + ("" if step["fits"] else " (does not fit)"))
    lines.append(f"{implementation:10s}{cells[0]:>19s}   {cells[1]}")
  return "\n".join(lines)
