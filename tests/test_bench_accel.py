"""`python -m o1jax.bench accel`: the random batch keeps the batch contract, the figures and ratios are computed
from the sides' numbers (missing where a side failed), and `--small --remat=full,none` runs all ten measurements
(two workloads x (o1jax training under each of two remat policies, PyTorch training, generation on both sides),
each in its own process) end to end on the CPU, writing every JSON field. Nothing here asserts a time."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from o1jax.bench import accel
from o1jax.data.batch import BatchShape

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_random_batch_keeps_the_contract():
  load = accel.FULL_LOAD
  batch = accel.random_batch(load, 32000)
  shape = BatchShape.of(batch, load.group_size)
  assert (shape.queries, shape.group_size, shape.query_length, shape.doc_length) == (8, 16, 256, 192)
  assert load.query_length % 64 == 0 and load.doc_length % 64 == 0  # cuDNN's tile
  special = accel.special_ids(32000)
  assert (batch["query_mask"] == 1).all() and (batch["doc_mask"] == 1).all()
  assert (batch["query_ids"][:, -1] == special.emb).all() and (batch["doc_ids"][:, -1] == special.emb).all()
  assert (batch["query_ids"][:, -2] == special.eos).all()
  loss = batch["query_loss_mask"]
  assert not loss[:, :load.prompt_length].any() and loss[:, load.prompt_length:-1].all() and not loss[:, -1].any()
  assert batch["query_ids"][:, 1:-2].max() < special.query  # no special token inside the text


def test_figures_and_ratios():
  ok = {"seconds": 2.0, "peak_memory_bytes": 10, "timed": 3, "wall_seconds": 9.0}
  j = accel._figures(ok, tokens=100, flops=8.0, peak=2.0)
  assert j["tokens_per_s"] == 50.0 and j["mfu"] == 2.0
  failed = accel._figures({"error": "exit status 1", "wall_seconds": 1.0}, tokens=100, flops=8.0, peak=2.0)
  assert failed["seconds"] is None and failed["mfu"] is None and failed["error"]
  assert accel._ratio(4.0, 2.0) == 2.0
  assert accel._ratio(None, 2.0) is None and accel._ratio(4.0, None) is None and accel._ratio(4.0, 0) is None
  assert accel._figures(ok, tokens=100, flops=8.0, peak=None)["mfu"] is None


def test_a_partial_run_reports_the_rest_as_not_run():
  args = accel.argparse.Namespace(small=True, workloads=list(accel.WORKLOADS), steps=2, repeats=2, remat=[])
  machine = {"platform": "cpu", "device_kind": "cpu", "device_count": 1, "peak_flops": 1e9,
             "peak_flops_source": "measured", "versions": {"jax": "x", "jaxlib": "x"}}
  raw = {("mistral7b_lora", "train", "jax", None): {"seconds": 0.5, "tokens": 128, "model_flops": 1e8,
                                              "peak_memory_bytes": None, "machine": machine, "timed": 2,
                                              "wall_seconds": 3.0}}
  report = accel.assemble(raw, args)
  first, rest = report["results"][0], report["results"][1:]
  assert first["o1jax"]["seconds"] == 0.5 and _close(first["o1jax"]["mfu"], 1e8 / 0.5 / 1e9)
  assert first["torch"]["error"] == "not run" and first["ratios"]["speedup"] is None
  assert len(rest) == 3 and all(r["o1jax"]["error"] == "not run" for r in rest)
  assert report["versions"]["torch"] is None and report["machine"]["device_kind"] == "cpu"
  accel.print_table(report)  # prints the errors, does not raise


def test_each_remat_policy_is_a_training_row_against_the_same_pytorch_step():
  args = accel.argparse.Namespace(small=True, workloads=["qwen2_5_0_5b_full"], steps=2, repeats=2,
                                  remat=["minimal", "full"])
  side = {"seconds": 0.5, "model_flops": 1e8, "peak_memory_bytes": 7, "timed": 2, "wall_seconds": 3.0}
  raw = {("qwen2_5_0_5b_full", "train", "jax", "minimal"): dict(side, peak_memory_bytes=9),
         ("qwen2_5_0_5b_full", "train", "jax", "full"): dict(side, seconds=1.0),
         ("qwen2_5_0_5b_full", "train", "torch", None): dict(side, seconds=2.0)}
  rows = accel.assemble(raw, args)["results"]
  assert [(r["task"], r["settings"]["o1jax_remat_policy"]) for r in rows] == [
      ("train", "minimal"), ("train", "full"), ("generate", None)]
  assert [r["ratios"]["speedup"] for r in rows[:2]] == [4.0, 2.0]
  assert [r["ratios"]["peak_memory"] for r in rows[:2]] == [9 / 7, 1.0]
  assert rows[2]["o1jax"]["error"] == "not run"


def test_generation_flops_counts_every_matmul():
  cfg = accel.model_config("qwen2_5_0_5b_full", small=True, generate=True)
  load = accel.SMALL_LOAD
  d, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
  per_layer = 2 * d * hd * (cfg.num_attention_heads + cfg.num_key_value_heads) + 3 * d * cfg.intermediate_size
  expected = (2 * layers * per_layer * load.gen_batch * (load.prompt_length + load.new_tokens)
              + 2 * d * cfg.vocab_size * load.gen_batch * load.new_tokens)
  assert accel.generation_flops(cfg, load) == expected


def _close(a, b):
  return math.isclose(a, b, rel_tol=1e-9)


@pytest.mark.e2e
def test_small_run_writes_every_field(tmp_path):
  out = tmp_path / "accel.json"
  proc = subprocess.run([sys.executable, "-m", "o1jax.bench", "accel", "--small", "--remat=full,none",
                         f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "speed-up" in proc.stdout and f"wrote {out}" in proc.stdout
  report = json.loads(out.read_text())

  assert isinstance(report["date"], str) and report["small"] is True
  m = report["machine"]
  assert m["platform"] == "cpu" and isinstance(m["device_kind"], str) and m["device_count"] >= 1
  assert m["torch_device"] == "cpu" and isinstance(m["cpu_model"], str) and m["cpu_cores"] >= 1
  assert set(report["versions"]) == {"jax", "jaxlib", "torch", "transformers", "peft"}
  assert all(isinstance(v, str) and v for v in report["versions"].values())
  assert "git_commit" in report and (report["git_commit"] is None or isinstance(report["git_commit"], str))
  assert report["peak_flops"] > 0 and "measured" in report["peak_flops_source"]
  assert report["steps"] == 2 and report["repeats"] == 2

  results = report["results"]
  assert [(r["workload"], r["task"], r["settings"]["o1jax_remat_policy"]) for r in results] == [
      (w, t, p) for w in accel.WORKLOADS for t, p in (("train", "full"), ("train", "none"), ("generate", None))]
  for r in results:
    where = f"{r['workload']} {r['task']}"
    assert r["tokens"] > 0 and r["model_flops"] > 0, where
    assert set(r["settings"]) == {"finetune", "dtype", "param_dtype", "o1jax_remat_policy",
                                  "torch_gradient_checkpointing"}, where
    for side in ("o1jax", "torch"):
      f = r[side]
      assert "error" not in f, (where, side, f)
      assert f["seconds"] > 0 and f["timed"] == 2 and f["wall_seconds"] >= f["seconds"], (where, side)
      assert _close(f["tokens_per_s"], r["tokens"] / f["seconds"]), (where, side)
      assert _close(f["mfu"], r["model_flops"] / f["seconds"] / report["peak_flops"]), (where, side)
      assert f["peak_memory_bytes"] is None, (where, side)  # the CPU reports none
    q = r["ratios"]
    assert _close(q["speedup"], r["torch"]["seconds"] / r["o1jax"]["seconds"]), where
    assert _close(q["tokens_per_s"], r["o1jax"]["tokens_per_s"] / r["torch"]["tokens_per_s"]), where
    assert _close(q["mfu"], r["o1jax"]["mfu"] / r["torch"]["mfu"]), where
    assert q["peak_memory"] is None, where

  # One PyTorch measurement per workload, shared by its o1jax rows; PyTorch keeps the workload's own checkpointing.
  for w in accel.WORKLOADS:
    full_remat, no_remat = (r for r in results if r["workload"] == w and r["task"] == "train")
    assert full_remat["torch"] == no_remat["torch"] and full_remat["o1jax"] != no_remat["o1jax"]
  train = {r["workload"]: r for r in results if r["task"] == "train"}  # the last row: remat none
  lora, full = train["mistral7b_lora"], train["qwen2_5_0_5b_full"]
  assert lora["settings"]["torch_gradient_checkpointing"] and not full["settings"]["torch_gradient_checkpointing"]
  assert lora["settings"]["param_dtype"] == "bfloat16" and full["settings"]["param_dtype"] == "float32"
  # LoRA trains a small fraction of what full fine-tuning trains, on the PyTorch side too.
  assert 0 < lora["torch"]["trainable_params"] < full["torch"]["trainable_params"]
  assert np.isfinite([r["o1jax"]["seconds"] for r in results]).all()
