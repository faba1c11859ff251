"""`python -m o1jax.bench.render [--results=DIR]`: the README's Benchmarks table, rendered from the committed JSON.

Reads the files the suites write with `--json` (DIR/generate.json, train.json, and train-bfloat16.json, data.json,
eval.json when present) and prints a Markdown paragraph naming the machine, then the table.
tests/test_bench_results.py fails when the README's table differs from this rendering. A ratio is printed in bold
only with the verdict "clean"; a noisy comparison shows its range over rounds instead.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "launch" / "results" / "bench"
HEADER = ("| suite | measurement | result |", "|---|---|---|")
NAMES = {"tiny_cpu": "tiny_cpu", "smollm2_135m": "SmolLM2-135M"}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def ratio_text(comparison: dict) -> str:
  """`**1.41x** (1.38-1.45x, 5 rounds, clean)` or `noisy: 0.70-1.20x over 5 rounds (median 0.90x)`."""
  r, n = comparison["ratio"], comparison["protocol"]["rounds"]
  span = f"{r['min']:.2f}-{r['max']:.2f}x"
  if comparison["verdict"] == "clean":
    return f"**{r['median']:.2f}x** ({span}, {n} rounds, clean)"
  return f"noisy: {span} over {n} rounds (median {r['median']:.2f}x)"


def _generate_rows(g: dict) -> list[tuple[str, str, str]]:
  s, tps = g["settings"], g["tokens_per_s"]
  out = [("generate", f"SmolLM2-135M fp32, batch {s['batch']}, {s['new_tokens']} new tokens: o1jax vs transformers "
          f"`generate`, {s['rounds']} rounds x {s['steps']}",
          f"{tps['o1jax']:.1f} vs {tps['transformers']:.1f} tokens/s, {ratio_text(g['comparison'])}")]
  floor = g["comparison"]["info"]["o1jax"].get("matmul_floor")
  if floor:
    per_token = 1e3 * g["comparison"]["sides"]["o1jax"]["median"] / s["new_tokens"]
    out.append(("generate", "o1jax per new token (prefill included) vs its decoding step's matmuls alone (the same "
                "weights, no attention, norms or cache: `bench.generate.matmul_floor`)",
                f"{per_token:.1f} vs {floor['ms']:.1f} ms ({floor['gb_per_s']:.1f} GB/s of {floor['weight_gb']:.2f} GB "
                "of weights)"))
  return out


def _train_rows(t: dict) -> list[tuple[str, str, str]]:
  s, configs = t["settings"], t["configs"]
  dtype = s.get("dtype", "float32")
  speed = ", ".join(f"{NAMES[name]} {ratio_text(c['comparison'])}" for name, c in configs.items())
  peak = ", ".join(f"{NAMES[name]} o1jax {c['figures']['o1jax']['matmul_peak_fraction']:.2f} / PyTorch "
                   f"{c['figures']['pytorch']['matmul_peak_fraction']:.2f}" for name, c in configs.items())
  compute = ("" if dtype == "float32" else
             f" in {dtype} (float32 weights and AdamW; PyTorch under autocast)")
  return [(t["suite"], f"one step{compute}, o1jax vs the same step in PyTorch `LlamaForCausalLM` (same losses, AdamW), "
           f"{s['rounds']} rounds x >= {s['steps']} steps and >= {s['round_seconds']:g} s", speed),
          (t["suite"], f"achieved FLOP/s over the measured {DTYPE_NAMES[dtype]} matmul peak "
           f"({t['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)", peak)]


def _data_rows(d: dict) -> list[tuple[str, str, str]]:
  ratios = ", ".join(f"{NAMES[name]} {c['ratio']:,.0f}x" for name, c in d["pipeline"].items())
  return [("data", "input pipeline examples/s over the training step's consumption", ratios)]


def _eval_rows(e: dict) -> list[tuple[str, str, str]]:
  rows = []
  for name, c in e["search"].items():
    rows.append(("eval", f"ScaNN vs exact search QPS at recall@{e['settings']['k']} {c['recall']:.3f}, "
                 f"{c['docs']:,} docs ({name})", f"{c['scann_qps'] / c['exact_qps']:.1f}x"))
  return rows


SUITES = (("generate", _generate_rows), ("train", _train_rows), ("train-bfloat16", _train_rows), ("data", _data_rows),
          ("eval", _eval_rows))


def load(results: pathlib.Path) -> dict[str, dict]:
  return {name: json.loads((results / f"{name}.json").read_text()) for name, _ in SUITES
          if (results / f"{name}.json").exists()}


def rows(reports: dict[str, dict]) -> list[str]:
  out = []
  for name, fn in SUITES:
    if name in reports:
      out.extend(f"| {suite} | {what} | {result} |" for suite, what, result in fn(reports[name]))
  return out


def machines(reports: dict[str, dict]) -> str:
  """One sentence per distinct machine / commit the reports were measured on."""
  seen = {}
  for name, r in reports.items():
    m = r["machine"]
    commit = m["git_commit"] or "no git"
    key = (m["cpu_model"], m["cpu_cores"], commit[:12] + ("+dirty" if commit.endswith("+dirty") else ""),
           m["versions"].get("jax"),
           m["versions"].get("torch"))
    seen.setdefault(key, []).append((name, m["date"][:10]))
  return " ".join(
      f"{', '.join(f'{n} ({d})' for n, d in suites)}: {cpu}, {cores} cores, commit {commit}, jax {jax}, torch {torch}."
      for (cpu, cores, commit, jax, torch), suites in seen.items())


def markdown(results: pathlib.Path = RESULTS) -> str:
  reports = load(results)
  if not reports:
    raise FileNotFoundError(f"no benchmark JSON in {results}")
  return "\n".join([machines(reports), "", *HEADER, *rows(reports)]) + "\n"


def cli() -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.bench.render", description=__doc__.splitlines()[0])
  parser.add_argument("--results", default=str(RESULTS), help="directory of the suites' JSON files")
  args = parser.parse_args()
  try:
    sys.stdout.write(markdown(pathlib.Path(args.results)))
  except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
    sys.exit(f"render: {args.results}: {type(e).__name__}: {e}")


if __name__ == "__main__":
  cli()
