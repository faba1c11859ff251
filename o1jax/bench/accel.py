"""Accelerator benchmark: `python -m o1jax.bench accel [--small] [--json=bench_accel.json] [--steps=N]`.

On whatever device jax and torch find (one GPU, or the CPU), with random weights (nothing downloaded):

* the training step at METHOD §4's per-device load (8 queries x 16 passages, query + thought 256 tokens,
  documents 192: multiples of 64 for cuDNN), bf16 compute, o1jax's `Trainer` vs the same step written with
  transformers + peft (`o1jax.bench.train.torch_contrastive_step`: SDPA attention, autocast bf16, AdamW), for
  - `mistral7b_lora`: Mistral-7B shape, LoRA r32 on every projection, bf16 base, full remat in o1jax /
    gradient checkpointing in PyTorch;
  - `qwen2_5_0_5b_full`: Qwen2.5-0.5B shape, full fine-tune with fp32 master weights, no remat;
* greedy generation, batch 64, 48-token prompts, 128 new tokens (every row runs the whole budget), bf16:
  `o1jax.generate.Generator` vs transformers' `generate`, for both shapes.

Each measurement runs in its own process (`--side=jax|torch --workload=W --task=train|generate`), so one side
never holds memory while the other runs and each peak memory is that measurement's alone. Reported per row:
median time of the timed steps after one warm-up (the compile), tokens/s, MFU (model FLOPs / the peak of
`o1jax.training.flops.PEAK_FLOPS` for the device kind, or on CPU `measured_matmul_peak()`, an fp32 figure),
peak device memory (jax `memory_stats()['peak_bytes_in_use']`, torch `max_memory_allocated()`; null where the
platform reports none, e.g. CPU) and the ratios o1jax / PyTorch. Training model FLOPs are
`flops.step_flops`; generation FLOPs are 2 x matmul parameters x tokens (prompt + new, attention left out).
`--small` shrinks every shape (2 layers, short lengths, few steps): a CPU smoke run of both sides.
`--remat=P[,P...]` times o1jax's training step once per named remat policy (`o1jax.model.REMAT_POLICIES`), one row
each against the same PyTorch measurement, so memory and time per policy come from one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from o1jax.bench import protocol
from o1jax.files import atomic_write_json

WORKLOADS = ("mistral7b_lora", "qwen2_5_0_5b_full")
TASKS = ("train", "generate")
SIDES = ("jax", "torch")

# configs/mistral7b.py's architecture; Qwen2.5-0.5B's from its Hugging Face config.json.
ARCHS = {
    "mistral7b_lora": dict(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768,
                           sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2_5_0_5b_full": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                              attention_bias=True, tie_word_embeddings=True, bos_token_id=151643,
                              eos_token_id=151643),
}
SMALL_ARCH = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)


@dataclasses.dataclass(frozen=True)
class Load:
  queries: int = 8
  group_size: int = 16
  query_length: int = 256
  doc_length: int = 192
  prompt_length: int = 48  # the part of each query row before the supervised thought; also generation's prompt
  gen_batch: int = 64
  new_tokens: int = 128


FULL_LOAD = Load()
SMALL_LOAD = Load(queries=2, group_size=2, query_length=32, doc_length=16, prompt_length=8, gen_batch=4,
                  new_tokens=8)


def workload_settings(workload: str) -> dict:
  """finetune, dtypes, remat (o1jax) and gradient checkpointing (PyTorch) of a workload."""
  if workload == "mistral7b_lora":
    return dict(finetune="lora", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full", checkpointing=True)
  return dict(finetune="full", dtype="bfloat16", param_dtype="float32", remat_policy="none", checkpointing=False)


def model_config(workload: str, small: bool, *, generate: bool = False, remat: str | None = None):
  """The workload's ModelConfig; `remat` replaces its training remat policy."""
  from o1jax.model import ModelConfig
  s = workload_settings(workload)
  arch = dict(ARCHS[workload], **(SMALL_ARCH if small else {}))
  # Generation serves bf16 weights in both implementations.
  return ModelConfig(**arch, dtype=s["dtype"], param_dtype="bfloat16" if generate else s["param_dtype"],
                     remat_policy="none" if generate else remat or s["remat_policy"], attention="auto")


def trainer_config(workload: str, load: Load):
  """base_config() with the workload's fine-tuning mode and the load's batch (METHOD §4: LoRA r32 alpha 64
  dropout 0.1 on every projection, tau 0.02, w_ctr 0.8 / w_gen 0.2, AdamW)."""
  from o1jax import config as o1config
  c = o1config.base_config()
  c.train.update(finetune=workload_settings(workload)["finetune"], steps=1000, batch_queries=load.queries,
                 group_size=load.group_size)
  return c


def special_ids(vocab_size: int):
  from o1jax.tokenizer import SpecialIds
  v = vocab_size
  return SpecialIds(query=v - 4, query_end=v - 3, thought=v - 2, emb=v - 1, eos=2, bos=1, pad=0)


def random_batch(load: Load, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """The batch contract's fields with random ids and full-length rows: `[BOS] query... thought... EOS <emb>`,
  the thought and EOS supervised after the first `prompt_length` positions; documents end in `<emb>`."""
  from o1jax.data.batch import BatchShape
  special = special_ids(vocab_size)
  rs = np.random.RandomState(seed)
  out = BatchShape(load.queries, load.group_size, load.query_length, load.doc_length).zeros()
  for ids, mask in (("query_ids", "query_mask"), ("doc_ids", "doc_mask")):
    out[ids][:] = rs.randint(3, vocab_size - 4, out[ids].shape)
    out[ids][:, -1] = special.emb
    out[mask][:] = 1
  out["query_ids"][:, 0] = special.bos
  out["query_ids"][:, -2] = special.eos
  out["query_loss_mask"][:, load.prompt_length:-1] = 1
  return out


def random_prompts(load: Load, vocab_size: int, seed: int = 1) -> np.ndarray:
  return np.random.RandomState(seed).randint(3, vocab_size - 4, (load.gen_batch, load.prompt_length))


def generation_flops(cfg, load: Load) -> float:
  """2 x matmul parameters x tokens: every layer on prompt + new tokens, the LM head on the new tokens."""
  d, hd = cfg.hidden_size, cfg.head_dim
  layer = (d * cfg.num_attention_heads * hd * 2 + d * cfg.num_key_value_heads * hd * 2
           + 3 * d * cfg.intermediate_size)
  tokens = load.gen_batch * (load.prompt_length + load.new_tokens)
  return float(2 * cfg.num_hidden_layers * layer * tokens + 2 * d * cfg.vocab_size * load.gen_batch * load.new_tokens)


def _median_time(fn, warmup, steps: int, sync=lambda: None) -> float:
  warmup()
  sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return float(statistics.median(times))


# ---- the jax side (one process per measurement) ----

def _jax_peak_bytes():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def _jax_machine(small: bool) -> dict:
  import jax
  import jaxlib
  from o1jax.training import flops
  device = jax.devices()[0]
  if device.platform == "cpu":
    peak, source = flops.measured_matmul_peak(size=1024 if small else 2048), "measured fp32 matmul (CPU)"
  else:
    peak = flops.PEAK_FLOPS.get(device.device_kind)
    source = f"PEAK_FLOPS[{device.device_kind!r}]" if peak else None
  return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
          "peak_flops": peak, "peak_flops_source": source,
          "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__}}


def jax_train(workload: str, small: bool, steps: int, remat: str | None = None) -> dict:
  import jax
  from o1jax import config as o1config, sharding
  from o1jax.data.batch import BatchShape
  from o1jax.training.trainer import Trainer
  load = SMALL_LOAD if small else FULL_LOAD
  cfg = model_config(workload, small, remat=remat)
  # One device: the per-device load against one PyTorch device.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  trainer = Trainer(cfg, o1config.trainer_settings(trainer_config(workload, load)), mesh, special_ids(cfg.vocab_size))
  holder = {"state": trainer.init_state(jax.random.key(0))}
  batch = trainer.shard_batch(random_batch(load, cfg.vocab_size))

  def step():
    holder["state"], metrics = trainer.step(holder["state"], batch)
    jax.block_until_ready(metrics)

  seconds = _median_time(step, step, steps)
  shape = BatchShape(load.queries, load.group_size, load.query_length, load.doc_length)
  return {"seconds": seconds, "tokens": shape.tokens(), "model_flops": trainer.flops_per_step(shape),
          "peak_memory_bytes": _jax_peak_bytes()}


def jax_generate(workload: str, small: bool, repeats: int) -> dict:
  import jax
  from o1jax.generate import Generator
  from o1jax.model import init_params
  load = SMALL_LOAD if small else FULL_LOAD
  cfg = model_config(workload, small, generate=True)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  # An EOS id that never occurs: every row runs the whole budget, as transformers' min_new_tokens makes it.
  generator = Generator(cfg, params, eos_ids=(-1,), pad_id=0)
  prompts = random_prompts(load, cfg.vocab_size).tolist()
  run = lambda: generator.generate(prompts, max_new_tokens=load.new_tokens)
  seconds = _median_time(run, run, repeats)
  return {"seconds": seconds, "tokens": load.gen_batch * load.new_tokens,
          "model_flops": generation_flops(cfg, load), "peak_memory_bytes": _jax_peak_bytes()}


# ---- the PyTorch side ----

def _torch_setup():
  import torch
  if torch.cuda.is_available():
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    return device, torch.cuda.synchronize
  torch.set_num_threads(os.cpu_count() or 1)
  return torch.device("cpu"), lambda: None


def _torch_peak_bytes(device):
  import torch
  return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def _torch_machine() -> dict:
  import peft
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return {"torch_device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__}}


def torch_model(cfg, device, dtype):
  """A randomly initialised transformers model of `cfg`'s architecture with SDPA attention, built on `device`."""
  import torch
  import transformers
  hf = dict(cfg.to_hf_dict())
  hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
  with torch.device(device):
    return transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")


def torch_train(workload: str, small: bool, steps: int) -> dict:
  import peft
  import torch
  from o1jax.bench.train import torch_contrastive_step
  device, sync = _torch_setup()
  torch.manual_seed(0)
  load = SMALL_LOAD if small else FULL_LOAD
  cfg = model_config(workload, small)
  config = trainer_config(workload, load)
  t, o = config.train, config.optim
  settings = workload_settings(workload)
  model = torch_model(cfg, device, torch.bfloat16 if settings["param_dtype"] == "bfloat16" else torch.float32)
  if settings["checkpointing"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if settings["finetune"] == "lora":
    special = special_ids(cfg.vocab_size)
    # As o1jax's LoRA recipe: adapters on every projection, the 4 special-token embedding rows trained.
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=int(t.lora.rank), lora_alpha=float(t.lora.alpha), lora_dropout=float(t.lora.dropout),
        target_modules=list(t.lora.targets),
        trainable_token_indices=[special.query, special.query_end, special.thought, special.emb])).base_model.model
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay,
                                fused=device.type == "cuda")
  batch = {k: torch.from_numpy(v).long().to(device) for k, v in random_batch(load, cfg.vocab_size).items()}
  step = lambda: torch_contrastive_step(model, optimizer, batch, tau=t.tau, group_size=t.group_size, w_ctr=t.w_ctr,
                                        w_gen=t.w_gen, clip_norm=o.clip_norm, autocast_dtype=torch.bfloat16)
  seconds = _median_time(step, step, steps, sync)
  return {"seconds": seconds, "peak_memory_bytes": _torch_peak_bytes(device),
          "trainable_params": sum(p.numel() for p in trainable)}


def torch_generate(workload: str, small: bool, repeats: int) -> dict:
  import torch
  device, sync = _torch_setup()
  torch.manual_seed(0)
  load = SMALL_LOAD if small else FULL_LOAD
  cfg = model_config(workload, small, generate=True)
  model = torch_model(cfg, device, torch.bfloat16).eval()
  ids = torch.from_numpy(random_prompts(load, cfg.vocab_size)).long().to(device)
  mask = torch.ones_like(ids)

  def generate(new_tokens):
    with torch.inference_mode():
      model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=2)

  seconds = _median_time(lambda: generate(load.new_tokens), lambda: generate(4), repeats, sync)
  return {"seconds": seconds, "peak_memory_bytes": _torch_peak_bytes(device)}


def run_side(args) -> dict:
  """One measurement in this process: its figures plus the machine and versions this side sees."""
  count = args.steps if args.task == "train" else args.repeats
  if args.side == "jax":
    if args.task == "train":
      out = jax_train(args.workload, args.small, count, args.remat)
    else:
      out = jax_generate(args.workload, args.small, count)
    out["machine"] = _jax_machine(args.small)
  else:
    fn = torch_train if args.task == "train" else torch_generate
    out = fn(args.workload, args.small, count)
    out["machine"] = _torch_machine()
  out["timed"] = count
  return out


# ---- the parent: spawn, collect, tabulate ----

def _child_env(side: str) -> dict:
  env = dict(os.environ)
  if side == "jax":
    # Training the 0.5B model without remat needs most of an 80 GB card; jax's default takes 75% of it.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  else:
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
  return env


def _spawn(side: str, workload: str, task: str, args, remat: str | None = None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, "-m", "o1jax.bench", "accel", f"--side={side}", f"--workload={workload}",
           f"--task={task}", f"--steps={args.steps}", f"--repeats={args.repeats}", f"--child_json={out}"]
    if args.small:
      cmd.append("--small")
    if remat:
      cmd.append(f"--remat={remat}")
    print(f"--- {side} {task} {workload}" + (f" remat={remat}" if remat else ""), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_child_env(side))
    wall = time.perf_counter() - start
    if proc.returncode or not os.path.exists(out):
      return {"error": f"exit status {proc.returncode} (see the log above)", "wall_seconds": wall}
    result = json.loads(pathlib.Path(out).read_text())
    result["wall_seconds"] = wall
    return result


def _ratio(a, b):
  return a / b if a is not None and b not in (None, 0) else None


def _figures(side: dict, tokens, flops, peak) -> dict:
  if "error" in side:
    return {"error": side["error"], "seconds": None, "tokens_per_s": None, "mfu": None, "peak_memory_bytes": None,
            "wall_seconds": side["wall_seconds"]}
  seconds = side["seconds"]
  out = {"seconds": seconds, "tokens_per_s": tokens / seconds if tokens else None,
         "mfu": flops / seconds / peak if flops and peak else None,
         "peak_memory_bytes": side["peak_memory_bytes"], "timed": side["timed"], "wall_seconds": side["wall_seconds"]}
  if "trainable_params" in side:
    out["trainable_params"] = side["trainable_params"]
  return out


def _gib(n):
  return f"{n / 2**30:.1f} GiB" if n is not None else "n/a"


def _pct(x):
  return f"{100 * x:.1f}%" if x is not None else "n/a"


def _num(x, fmt):
  return format(x, fmt) if x is not None else "n/a"


def print_table(report: dict) -> None:
  m = report["machine"]
  print(f"\naccel benchmark{' (--small)' if report['small'] else ''}: {m['device_count']} x {m['device_kind']} "
        f"({m['platform']}); torch on {m['torch_device']}; MFU over {report['peak_flops_source']}")
  header = ("workload", "task", "o1jax s", "o1jax tok/s", "o1jax MFU", "o1jax mem", "torch s", "torch tok/s",
            "torch MFU", "torch mem", "speed-up", "mem ratio")
  rows = [header]
  for r in report["results"]:
    j, t, q = r["o1jax"], r["torch"], r["ratios"]
    rows.append((r["workload"], r["task"], _num(j["seconds"], ".4f"), _num(j["tokens_per_s"], ",.0f"), _pct(j["mfu"]),
                 _gib(j["peak_memory_bytes"]), _num(t["seconds"], ".4f"), _num(t["tokens_per_s"], ",.0f"),
                 _pct(t["mfu"]), _gib(t["peak_memory_bytes"]),
                 f"{q['speedup']:.2f}x" if q["speedup"] is not None else "n/a",
                 _num(q["peak_memory"], ".2f")))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  for row in rows:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
  for r in report["results"]:
    for side in ("o1jax", "torch"):
      if "error" in r[side]:
        print(f"{r['workload']} {r['task']} {side}: {r[side]['error']}")


def _policies(workload: str, task: str, args) -> list[str | None]:
  """o1jax's remat policies measured for a row: `--remat`'s for training, else the workload's own (None)."""
  return list(args.remat) if task == "train" and args.remat else [None]


def run_all(args, write=lambda report: None) -> dict:
  """Every measurement, each in its own process; `write(report)` after each one, so that a run stopped part-way
  (a time limit) still leaves the figures it had (the rest as errors "not run"). Raw results are keyed
  (workload, task, side, remat policy or None)."""
  raw = {}
  for w in args.workloads:
    for task in TASKS:
      for remat in _policies(w, task, args):
        raw[(w, task, "jax", remat)] = _spawn("jax", w, task, args, remat)
        write(assemble(raw, args))
      raw[(w, task, "torch", None)] = _spawn("torch", w, task, args)
      write(assemble(raw, args))
  return assemble(raw, args)


def assemble(raw: dict, args) -> dict:
  """The report of the measurements in `raw` ((workload, task, side) -> a child's result)."""
  from o1jax.data.batch import BatchShape  # no device is touched in this process
  load = SMALL_LOAD if args.small else FULL_LOAD
  not_run = {"error": "not run", "wall_seconds": 0.0}
  jax_machines = [r["machine"] for (_, _, side, _), r in raw.items() if side == "jax" and "machine" in r]
  torch_machines = [r["machine"] for (_, _, side, _), r in raw.items() if side == "torch" and "machine" in r]
  jm = jax_machines[0] if jax_machines else {"platform": None, "device_kind": None, "device_count": None,
                                             "peak_flops": None, "peak_flops_source": None, "versions": {}}
  tm = torch_machines[0] if torch_machines else {"torch_device": None, "versions": {}}
  peak = jm["peak_flops"]
  results = []
  for w, task, remat in [(w, t, r) for w in args.workloads for t in TASKS for r in _policies(w, t, args)]:
    mine, theirs = raw.get((w, task, "jax", remat), not_run), raw.get((w, task, "torch", None), not_run)
    if task == "train":
      tokens = BatchShape(load.queries, load.group_size, load.query_length, load.doc_length).tokens()
      flops = mine.get("model_flops")  # None when the jax side failed
      shape = {"queries": load.queries, "group_size": load.group_size, "query_length": load.query_length,
               "doc_length": load.doc_length}
    else:
      tokens = load.gen_batch * load.new_tokens
      flops = generation_flops(model_config(w, args.small, generate=True), load)
      shape = {"batch": load.gen_batch, "prompt_length": load.prompt_length, "new_tokens": load.new_tokens}
    s = workload_settings(w)
    j, t = _figures(mine, tokens, flops, peak), _figures(theirs, tokens, flops, peak)
    results.append({
        "workload": w, "task": task, "shape": shape, "tokens": tokens, "model_flops": flops,
        "settings": {"finetune": s["finetune"], "dtype": s["dtype"],
                     "param_dtype": "bfloat16" if task == "generate" else s["param_dtype"],
                     "o1jax_remat_policy": (remat or s["remat_policy"]) if task == "train" else None,
                     "torch_gradient_checkpointing": s["checkpointing"] if task == "train" else None},
        "o1jax": j, "torch": t,
        "ratios": {"speedup": _ratio(t["seconds"], j["seconds"]),
                   "tokens_per_s": _ratio(j["tokens_per_s"], t["tokens_per_s"]),
                   "mfu": _ratio(j["mfu"], t["mfu"]),
                   "peak_memory": _ratio(j["peak_memory_bytes"], t["peak_memory_bytes"])}})
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "small": bool(args.small),
      "machine": {"platform": jm["platform"], "device_kind": jm["device_kind"], "device_count": jm["device_count"],
                  "torch_device": tm["torch_device"], "cpu_model": protocol.cpu_model(), "cpu_cores": os.cpu_count(),
                  "python": platform.python_version()},
      "versions": {"jax": jm["versions"].get("jax"), "jaxlib": jm["versions"].get("jaxlib"),
                   "torch": tm["versions"].get("torch"), "transformers": tm["versions"].get("transformers"),
                   "peft": tm["versions"].get("peft")},
      "git_commit": protocol.git_commit(),
      "peak_flops": peak, "peak_flops_source": jm["peak_flops_source"],
      "steps": args.steps, "repeats": args.repeats,
      "results": results,
  }


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.bench accel", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", default="bench_accel.json", help="where to write every figure (JSON)")
  parser.add_argument("--small", action="store_true", help="tiny shapes and lengths: a CPU smoke run")
  parser.add_argument("--steps", type=int, default=None, help="timed training steps per side (default 5; 2 small)")
  parser.add_argument("--repeats", type=int, default=None, help="timed generations per side (default 3; 2 small)")
  parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
  parser.add_argument("--remat", default="", help="comma-separated remat policies for o1jax's training step, one "
                      "row each (default: each workload's own)")
  # One measurement in this process (what the parent spawns).
  parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
  parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
  parser.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
  parser.add_argument("--child_json", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.steps = args.steps or (2 if args.small else 5)
  args.repeats = args.repeats or (2 if args.small else 3)
  from o1jax.model import REMAT_POLICIES
  args.remat = [p for p in args.remat.split(",") if p]
  if [p for p in args.remat if p not in REMAT_POLICIES] or len(set(args.remat)) != len(args.remat):
    parser.error(f"--remat={','.join(args.remat)}: expected distinct names of {', '.join(REMAT_POLICIES)}")
  if args.side:
    args.remat = args.remat[0] if args.remat else None
    if not (args.workload and args.task and args.child_json):
      parser.error("--side needs --workload, --task and --child_json")
    try:
      result = run_side(args)
    except Exception:
      traceback.print_exc()
      sys.exit(1)
    pathlib.Path(args.child_json).write_text(json.dumps(result))
    return
  args.workloads = [w for w in args.workloads.split(",") if w]
  unknown = [w for w in args.workloads if w not in WORKLOADS]
  if unknown or not args.workloads:
    parser.error(f"--workloads: unknown {unknown}; expected a subset of {','.join(WORKLOADS)}")
  path = pathlib.Path(args.json)
  write = lambda report: atomic_write_json(path, report)  # a reader never sees half a report
  report = run_all(args, write)
  print_table(report)
  write(report)
  print(f"wrote {path}")
