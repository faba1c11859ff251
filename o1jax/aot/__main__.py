"""Ahead-of-time fit report: compile the real training and encode steps for a TPU slice on a CPU machine.

  python -m o1jax.aot --config=configs/mistral7b.py[:full] --topology=v5p-128 [--slices=N] [--config.a.b=v ...]

Nothing runs and no weights or data are read: the model's shape comes from `config.model.arch`, the state and
batch are ShapeDtypeStructs carrying their shardings on a mesh of the slice's devices, and XLA's TPU compiler (the
optional `libtpu` package, requirements-tpu.txt) compiles exactly the program a pod would run. The report gives
per-device memory (arguments, outputs, temporaries, total vs the chip's HBM), compiled FLOPs vs the trainer's
analytic count, and tokens per step. Exit status 1 when either step does not fit (or the compiler runs out of
memory), 2 on a bad command line or config. `--slices=N` compiles for N such slices joined over the data-center
network, the data axis across them (config.mesh.dcn_data, set to N unless the config gives it).
`--attention=einsum,splash` compiles both steps once per attention implementation (config.model.attention) and ends
with their per-device memory side by side; with `--encode_length=8192` that is what a fused kernel saves on long
documents. The JSON then holds one report per implementation.

Topologies: see `o1jax.aot.topology`; the report: `o1jax.aot.fit`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import jax

from o1jax import config as o1config, sharding
from o1jax.aot.fit import EVAL_DOC_LENGTH, fit_report, format_comparison, format_report
from o1jax.aot.topology import resolve_topology
from o1jax.files import atomic_write_json
from o1jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m o1jax.aot", description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", required=True, help="v5p-128, v5e-256, v4-64, v6e-64, v5p:4x4x4 or cpu-N")
  parser.add_argument("--slices", type=int, default=1, help="identical TPU slices joined over the data-center "
                      "network (multi-slice); sets config.mesh.dcn_data")
  parser.add_argument("--hbm_gib", type=float, default=None, help="memory per chip (cpu-N: per device) to check "
                      "against, instead of the table / host RAM")
  parser.add_argument("--encode_rows", type=int, default=None,
                      help="rows of the encode step (default: the training batch's passages)")
  parser.add_argument("--encode_length", type=int, default=EVAL_DOC_LENGTH, help="tokens per encoded row")
  parser.add_argument("--json", default="", help="also write the report as JSON to this path")
  parser.add_argument("--attention", default="", help="comma-separated implementations to compare (e.g. "
                      "einsum,splash); default: the config's")
  args, config_argv = parser.parse_known_args(argv)
  cpu = re.fullmatch(r"cpu-(\d+)", args.topology)
  if cpu and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    try:
      jax.config.update("jax_num_cpu_devices", int(cpu.group(1)))
    except RuntimeError:
      pass  # jax already started in this process: resolve_topology reports a device count that differs
  try:
    config = o1config.load(config_argv)
    if args.slices > 1 and sharding.dcn_data(config.mesh) == 1:
      config.mesh.dcn_data = args.slices
    topology = resolve_topology(args.topology, args.hbm_gib, args.slices)
    implementations = [a.strip() for a in args.attention.split(",") if a.strip()]
    for implementation in implementations:
      if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"--attention: {implementation!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    reports = {}
    for implementation in implementations or [config.model.attention]:
      config.model.attention = implementation
      reports[implementation] = fit_report(config, topology, args.encode_rows, args.encode_length)
      print(format_report(reports[implementation]))
  except ValueError as e:  # ConfigError included
    print(f"o1jax.aot: {e}", file=sys.stderr)
    return 2
  if len(implementations) > 1:
    print(format_comparison(reports))
  if args.json:
    atomic_write_json(args.json, reports if len(implementations) > 1 else next(iter(reports.values())))
  return 0 if all(report["fits"] for report in reports.values()) else 1


def cli() -> None:
  """`python -m o1jax.aot` and the `o1jax-aot` command: exit 0 fits, 1 does not fit, 2 bad input."""
  sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
  cli()
