"""Benchmark figures that reproduce: the README's Benchmarks table is exactly what `o1jax.bench.render` makes of
the committed JSON in launch/results/bench; the protocol's median / spread / verdict on hand-made rounds; and a
real A/B run of two worker processes whose costs are known (sleeps of 20 and 40 ms), interleaved in turns."""
import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from o1jax import host_allocator
from o1jax.bench import protocol, render

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDES = (protocol.Side("a", []), protocol.Side("b", []))


def _benchmarks_section() -> str:
  readme = (ROOT / "README.md").read_text()
  start = readme.index("\n## Benchmarks\n")
  return readme[start:readme.index("\n## ", start + 1)]


def _table(text: str) -> list[list[str]]:
  return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
          if line.startswith("|") and not line.startswith("|---")]


def test_the_readme_table_is_the_committed_json_rendered():
  rendered = render.markdown()
  section = _benchmarks_section()
  readme_rows, json_rows = _table(section), _table(rendered)
  assert readme_rows[0] == ["suite", "measurement", "result"]
  for i, (readme_row, json_row) in enumerate(zip(readme_rows, json_rows)):
    assert readme_row == json_row, f"README Benchmarks row {i} differs from launch/results/bench/*.json"
  assert len(readme_rows) == len(json_rows), "README Benchmarks table and launch/results/bench/*.json differ in rows"
  assert rendered.splitlines()[0] in section, "the machine line above the table is not the JSON's"


def test_every_committed_result_names_its_machine_and_protocol():
  reports = render.load(render.RESULTS)
  assert {"generate", "train"} <= set(reports)
  for name, report in reports.items():
    m = report["machine"]
    assert report["suite"] == name and m["cpu_model"] and m["cpu_cores"] >= 1 and m["date"], name
    assert m["versions"]["jax"] and m["versions"]["torch"] and m["versions"]["python"], name
  comparisons = [reports["generate"]["comparison"], *(c["comparison"] for c in reports["train"]["configs"].values())]
  for c in comparisons:
    assert c["verdict"] in ("clean", "noisy") and c["protocol"]["rounds"] == len(c["rounds"]) >= 2
    assert all(r["load_average_1m"] is not None for r in c["rounds"])
    per_round = [statistics.median(r["seconds"]["pytorch" if "pytorch" in r["seconds"] else "transformers"])
                 / statistics.median(r["seconds"]["o1jax"]) for r in c["rounds"]]
    assert per_round == pytest.approx(c["ratio"]["values"])


def test_summarize():
  s = protocol.summarize([1.0, 1.2, 0.9, 1.1, 1.0])
  assert s["median"] == 1.0 and s["min"] == 0.9 and s["max"] == 1.2 and s["spread"] == pytest.approx(0.3)


def test_verdict_is_clean_only_when_quiet_and_tight():
  limits = protocol.Thresholds(max_spread=0.1, max_load_per_core=0.5, max_foreign_cores=0.25)
  tight, wide = protocol.summarize([1.0, 1.05, 0.98]), protocol.summarize([1.0, 1.5, 0.9])
  assert protocol.verdict({"x": tight}, 0.3, 2, [0.0, 0.1], limits) == ("clean", [])
  state, reasons = protocol.verdict({"x": tight, "ratio": wide}, 0.3, 2, [0.0], limits)
  assert state == "noisy" and reasons == ["ratio spread 60% > 10%"]
  state, reasons = protocol.verdict({"x": tight}, 1.0, 2, [0.0], limits)  # 0.5 x 2 cores is the limit
  assert state == "noisy" and "load 1.00" in reasons[0]
  state, reasons = protocol.verdict({"x": tight}, 0.2, 2, [0.1, 0.9, None], limits)
  assert state == "noisy" and "0.90 cores" in reasons[0]
  assert protocol.verdict({"x": tight}, None, 2, [None], limits)[0] == "clean"  # no /proc: spreads decide


def _rounds(a_times, b_times, foreign=0.0):
  return [{"load_average_1m": 0.1, "order": ["a", "b"], "seconds": {"a": a, "b": b},
           "foreign_cores": {"a": foreign, "b": foreign}, "after": {"a": {}, "b": {}}}
          for a, b in zip(a_times, b_times)]


def test_assemble_takes_each_rounds_median_and_the_per_round_ratio():
  records = _rounds([[1.0, 9.0, 1.1], [1.0, 1.0, 1.0]], [[2.0, 2.2, 2.1], [2.0, 2.0, 2.0]])
  result = protocol.assemble(SIDES, records, {}, 0.1, protocol.Thresholds(), cores=2)
  assert result["sides"]["a"]["values"] == [1.1, 1.0] and result["sides"]["b"]["values"] == [2.1, 2.0]
  assert result["ratio"]["values"] == pytest.approx([2.1 / 1.1, 2.0])
  assert result["verdict"] == "clean" and result["protocol"]["steps_per_round"] == {"a": [3, 3], "b": [3, 3]}
  assert "= 1.95x" in protocol.describe(result, "speed-up")


def test_a_noisy_run_prints_no_bare_ratio():
  records = _rounds([[1.0], [1.0], [1.0]], [[1.0], [2.0], [1.5]])
  result = protocol.assemble(SIDES, records, {}, 0.1, protocol.Thresholds(), cores=2)
  line = protocol.describe(result, "speed-up")
  assert result["verdict"] == "noisy" and "NOISY" in line and "1.00x-2.00x" in line and "=" not in line
  cell = render.ratio_text(result)
  assert cell.startswith("noisy:") and "**" not in cell
  clean = protocol.assemble(SIDES, _rounds([[1.0], [1.0]], [[2.0], [2.0]]), {}, 0.1, protocol.Thresholds(), cores=2)
  assert render.ratio_text(clean) == "**2.00x** (2.00-2.00x, 2 rounds, clean)"


WORKER = """
import sys, time
from o1jax.bench import protocol
delay = float(sys.argv[1])
if delay < 0:
  sys.exit(3)
protocol.serve(lambda: protocol.Workload(run=lambda: time.sleep(delay), info={"delay": delay},
                                         after=lambda: {"pid_ok": True}), steps=2)
"""


def _side(name, delay, env=None):
  return protocol.Side(name, [sys.executable, "-c", WORKER, str(delay)], env)


def test_a_real_ab_run_of_two_worker_processes():
  # Each worker runs in the environment its side names, and says which host allocator it got.
  mimalloc = host_allocator.environment({k: v for k, v in os.environ.items() if k != host_allocator.SWITCH})
  result = protocol.compare((_side("fast", 0.02, mimalloc), _side("slow", 0.04)), rounds=3, pause=0.05)
  assert [r["order"] for r in result["rounds"]] == [["fast", "slow"], ["slow", "fast"], ["fast", "slow"]]
  assert result["info"] == {"fast": {"delay": 0.02, "host_allocator": "mimalloc"},
                            "slow": {"delay": 0.04, "host_allocator": host_allocator.active()}}
  assert all(len(r["seconds"]["fast"]) == 2 and r["after"]["slow"] == {"pid_ok": True} for r in result["rounds"])
  assert 0.02 <= result["sides"]["fast"]["min"] and 0.04 <= result["sides"]["slow"]["min"]
  assert 1.3 < result["ratio"]["median"] < 2.5  # sleeps overshoot a little, never by 20 ms on both sides
  assert result["ratio"]["of"] == "slow seconds / fast seconds"
  assert all(f is None or f >= 0 for r in result["rounds"] for f in r["foreign_cores"].values())
  # Each worker's own CPU in every turn: the waiting one's shows whether it spins while the other is timed.
  for r in result["rounds"]:
    for turn in r.get("worker_cores", {}).values():
      assert set(turn) == {"fast", "slow"} and all(c >= 0 for c in turn.values())
  assert result["verdict"] in ("clean", "noisy") and json.dumps(result)


def test_a_suite_judges_every_workload_by_the_load_before_its_first():
  # The second workload of a suite starts under the load average its first one left behind.
  result = protocol.compare((_side("a", 0.01), _side("b", 0.01)), rounds=1, pause=0, load_before=1e6)
  assert result["load_before"] == 1e6 and result["verdict"] == "noisy"
  assert any("before the run" in reason for reason in result["reasons"])


def test_the_written_machine_says_its_load_was_read_after_the_run(tmp_path):
  # Written with the JSON, the machine's load holds the run's own work: named so, not mistaken for `load_before`.
  protocol.write_json(str(tmp_path / "r.json"), "s", {"load_before": 0.25})
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["suite"] == "s" and report["load_before"] == 0.25
  assert "load_average_1m" not in report["machine"] and report["machine"]["load_average_1m_when_written"] >= 0


def test_a_dead_worker_is_one_error():
  with pytest.raises(RuntimeError, match="the broken worker exited with status 3"):
    protocol.compare((_side("fine", 0.01), _side("broken", -1)), rounds=1, pause=0)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--gguf=/nonexistent.gguf"], "--gguf: no such file"),
    (["generate", "--gguf=README.md", "--rounds=0"], "must be >= 1"),
    (["train", "--configs=mistral"], "--configs: expected a subset"),
])
def test_bad_options_are_one_line_before_anything_loads(argv, message):
  proc = subprocess.run([sys.executable, "-m", "o1jax.bench", *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_matmul_floor_reads_every_projection_and_the_head():
  import re
  import jax
  import jax.numpy as jnp
  from o1jax.bench.generate import decode_kernels, decode_matmuls, matmul_floor
  from o1jax.model import ModelConfig, decoding_layout, init_params
  cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
  _, params = decoding_layout(cfg, init_params(cfg, jax.random.key(0)))
  floor = matmul_floor(params, batch=8, repeats=2)
  hidden, heads, kv, mlp = 32, 4 * 8, 2 * 8, 64
  layer = hidden * heads + 2 * hidden * kv + heads * hidden + 3 * hidden * mlp
  assert round(floor["weight_gb"] * 1e9) == 4 * (3 * layer + hidden * 97)
  assert floor["ms"] > 0 and floor["gb_per_s"] == pytest.approx(floor["weight_gb"] / floor["ms"] * 1e3)
  # XLA keeps every matmul: the key and value projections feed nothing but a sum times zero.
  layers, head = decode_kernels(params)
  assert len(layers) == 3 and all(len(kernels) == 7 for kernels in layers)
  compiled = jax.jit(decode_matmuls).lower(jnp.ones((8, hidden)), layers, head).compile()
  assert len(re.findall(r"\} dot\(", compiled.as_text())) == 7 * 3 + 1


def test_a_bfloat16_train_run_is_its_own_suite_and_row(tmp_path):
  """Both workers really run the step in bfloat16 (o1jax's compute dtype, PyTorch's autocast), the figures land in
  train-bfloat16.json, and the table gets rows that say so next to the float32 ones."""
  out = tmp_path / "train-bfloat16.json"
  subprocess.run([sys.executable, "-m", "o1jax.bench", "train", "--configs=tiny_cpu", "--dtype=bfloat16", "--rounds=2",
                  "--steps=1", "--round_seconds=0", f"--json={out}"], check=True, cwd=ROOT, timeout=600,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  report = json.loads(out.read_text())
  assert report["suite"] == "train-bfloat16" and report["settings"]["dtype"] == "bfloat16"
  run = report["configs"]["tiny_cpu"]
  assert run["comparison"]["info"]["o1jax"]["dtype"] == "bfloat16"
  assert run["comparison"]["info"]["pytorch"]["autocast"] == "bfloat16"
  assert all(run["figures"][side]["ms_per_step"] > 0 for side in ("o1jax", "pytorch"))
  rows = render.rows({"train-bfloat16": report})
  assert len(rows) == 2 and "one step in bfloat16 (float32 weights and AdamW; PyTorch under autocast)" in rows[0]
  assert "measured bf16 matmul peak" in rows[1]
