"""Train-step benchmark: `python -m o1jax.bench train [--gguf=FILE] [--rounds=R] [--steps=N] [--json=PATH]`.

For tiny_cpu and (given the GGUF file, or O1JAX_SHARED) smollm2_135m, both with full fine-tuning: o1jax's step
vs the same step (same weights, batch, lengths, losses and AdamW update) written with transformers' PyTorch
`LlamaForCausalLM`. Each side runs in its own process, compiled / warmed up, and the two are timed in turns over
`--rounds` rounds of `--steps` steps, more until a round lasts `--round_seconds` (`o1jax.bench.protocol`): step
time, tokens/s, achieved FLOP/s over the matmul peak measured at start-up (in `--dtype`), peak RSS of each process,
the speed-up with its spread and a verdict. (Compiling a config's step from shapes alone, e.g. Mistral-7B on 8 fake
CPU devices, with XLA's memory analysis: `python -m o1jax.aot --config=... --topology=cpu-8`.)
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile

import numpy as np

from o1jax import host_allocator
from o1jax.bench import protocol

CONFIGS = ("tiny_cpu", "smollm2_135m")
DTYPES = ("float32", "bfloat16")
SIDES = ("o1jax", "pytorch")


def _rss_gib() -> dict:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return {"peak_rss_gib": usage.ru_maxrss / 2**20, "user_s": usage.ru_utime, "system_s": usage.ru_stime,
          "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt}


def _kernel_time(rounds: list[dict], side: str) -> dict:
  """Median system seconds and minor page faults per round of `side` (from the second round: each round's
  figures are the worker's totals so far). A step that maps its temporaries afresh spends them in page faults."""
  totals = [r["after"][side] for r in rounds]
  if len(totals) < 2:
    return {}
  median = lambda key: statistics.median(b[key] - a[key] for a, b in zip(totals, totals[1:]))
  return {"system_s_per_round": median("system_s"), "minor_faults_per_round": median("minor_faults")}


def torch_contrastive_step(model, optimizer, batch, *, tau: float, group_size: int, w_ctr: float, w_gen: float,
                           clip_norm: float, autocast_dtype=None) -> float:
  """One o1jax step in PyTorch on a transformers `*ForCausalLM` (LoRA layers injected by peft or not): one query
  pass (L_gen + `<emb>` pooling), documents through the backbone, global InfoNCE over fp32 cosine scores / tau,
  w_ctr * L_ctr + w_gen * L_gen, clipping of the trainable parameters, the optimizer's update. `batch` holds the
  batch contract's fields as int64 tensors on the model's device; `autocast_dtype` (e.g. torch.bfloat16) runs
  the forward and backward under autocast (fp32 master weights, bf16 compute). Returns the loss (a host sync)."""
  import torch
  device = batch["query_ids"].device

  def embed(hidden, mask):
    last = mask.sum(1) - 1
    return torch.nn.functional.normalize(hidden[torch.arange(hidden.shape[0], device=device), last].float(), dim=-1)

  def positions(mask):
    return (mask.cumsum(1) - 1).clamp(min=0)

  with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
    q = model.model(input_ids=batch["query_ids"], attention_mask=batch["query_mask"],
                    position_ids=positions(batch["query_mask"])).last_hidden_state
    logits = model.lm_head(q[:, :-1]).float()
    target, weight = batch["query_ids"][:, 1:], batch["query_loss_mask"][:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    loss_gen = (nll * weight).sum() / weight.sum().clamp(min=1)
    d = model.model(input_ids=batch["doc_ids"], attention_mask=batch["doc_mask"],
                    position_ids=positions(batch["doc_mask"])).last_hidden_state
    scores = embed(q, batch["query_mask"]) @ embed(d, batch["doc_mask"]).T / tau
    labels = torch.arange(scores.shape[0], device=device) * group_size
    loss = w_ctr * torch.nn.functional.cross_entropy(scores, labels) + w_gen * loss_gen
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_norm)
  optimizer.step()
  return loss.item()


def torch_step_fn(model_dir: str, config, batch: dict[str, np.ndarray], autocast_dtype=None):
  """The o1jax step in PyTorch `LlamaForCausalLM` (fp32 weights, full fine-tuning; compute under `autocast_dtype`
  when given): `torch_contrastive_step` on the weights saved in `model_dir`."""
  import torch
  import transformers
  t, o = config.train, config.optim
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  b = {k: torch.from_numpy(v).long() for k, v in batch.items()}
  return lambda: torch_contrastive_step(model, opt, b, tau=t.tau, group_size=t.group_size, w_ctr=t.w_ctr,
                                        w_gen=t.w_gen, clip_norm=o.clip_norm, autocast_dtype=autocast_dtype)


def _setup(name: str, gguf: str, dtype: str):
  """The config, run settings, model, host batch and trainer of config `name` (full fine-tuning, one mesh, fp32
  weights, `dtype` compute)."""
  import jax
  from o1jax import config as o1config, sharding
  from o1jax.data import batching
  from o1jax.training import sources
  from o1jax.training.trainer import Trainer
  overrides = [f"--config.model.path={gguf}"] if name == "smollm2_135m" else []
  config = o1config.load([f"--config=configs/{name}.py", "--config.train.finetune=full", "--config.checkpoint.dir=",
                          f"--config.model.dtype={dtype}", "--config.model.param_dtype=float32", *overrides])
  with config.unlocked():
    config.mesh.update(data=1, fsdp=-1, tensor=1)
  o1config.validate(config, jax.device_count())
  run = o1config.settings(config)
  model_cfg, params, tokenizer, special = sources.build_model(run.model, run.data)
  host = batching.Batcher(sources.load_records(run.data), tokenizer, special, run.batch).batch(0)
  trainer = Trainer(model_cfg, run.trainer, sharding.make_mesh(config.mesh), special)
  return config, run, model_cfg, params, host, trainer


def o1jax_side(name: str, gguf: str, dtype: str) -> protocol.Workload:
  import jax
  _, run, model_cfg, params, host, trainer = _setup(name, gguf, dtype)
  holder = {"state": trainer.init_state(jax.random.key(run.seed), params)}
  batch = trainer.shard_batch(host)

  def step():
    holder["state"], metrics = trainer.step(holder["state"], batch)
    jax.block_until_ready(metrics)

  shape = run.batch.shape()
  return protocol.Workload(run=step, after=_rss_gib, info={
      "tokens": shape.tokens(), "flops_per_step": trainer.flops_per_step(shape), "family": model_cfg.family,
      "dtype": model_cfg.dtype,
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"})


def pytorch_side(name: str, gguf: str, dtype: str) -> protocol.Workload:
  import torch
  import jax
  from o1jax.convert import save_hf
  config, run, model_cfg, params, host, trainer = _setup(name, gguf, dtype)
  # The o1jax side's initial weights: the same seed (tiny_cpu initialises in init_state) or GGUF.
  params = jax.device_get(trainer.init_state(jax.random.key(run.seed), params)["params"])
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "model")
    save_hf(model_cfg, params, model_dir)
    del params
    autocast = None if dtype == "float32" else dtype
    step = torch_step_fn(model_dir, config, host, autocast_dtype=autocast and getattr(torch, autocast))
  return protocol.Workload(run=step, after=_rss_gib, info={"threads": torch.get_num_threads(), "autocast": autocast})


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.bench train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gguf", default="", help="SmolLM2-135M-Instruct GGUF file (default: from O1JAX_SHARED)")
  parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each side once per round)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round (median)")
  parser.add_argument("--round_seconds", type=float, default=2.0,
                      help="more steps per round until a round lasts this long (tiny_cpu's steps take ms)")
  parser.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="compute dtype of both sides; weights and AdamW stay float32 (bfloat16: o1jax's "
                           "config.model.dtype, PyTorch under autocast)")
  parser.add_argument("--json", default="", help="write every figure, the machine and the verdicts here")
  parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
  parser.add_argument("--worker_config", choices=CONFIGS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  configs = [c for c in args.configs.split(",") if c]
  if not configs or any(c not in CONFIGS for c in configs):
    parser.error(f"--configs: expected a subset of {','.join(CONFIGS)}, got {args.configs!r}")
  if min(args.rounds, args.steps) < 1:
    parser.error("--rounds and --steps must be >= 1")
  shared = os.environ.get("O1JAX_SHARED")
  gguf = args.gguf or (os.path.join(shared, "data", "smollm2-135m-instruct-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
                       if shared else "")
  if gguf and not os.path.isfile(gguf):
    parser.error(f"--gguf: no such file: {gguf}")
  if args.worker:
    side = o1jax_side if args.worker == "o1jax" else pytorch_side
    protocol.serve(lambda: side(args.worker_config, gguf, args.dtype), args.steps, args.round_seconds)
    return

  from o1jax.training.flops import measured_matmul_peak
  load_before = protocol.load_average()  # before the peak measurement and every config's workers
  peak = measured_matmul_peak(dtype=args.dtype)
  print(f"{args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
  results = {}
  env = host_allocator.cpu_environment(os.environ)  # both sides: the ratio compares the frameworks, not mallocs
  for name in configs:
    if name == "smollm2_135m" and not gguf:
      print("smollm2_135m skipped: pass --gguf=FILE or set O1JAX_SHARED")
      continue
    sides = tuple(protocol.Side(s, [sys.executable, "-m", "o1jax.bench", "train", f"--worker={s}",
                                    f"--worker_config={name}", f"--gguf={gguf}", f"--dtype={args.dtype}",
                                    f"--steps={args.steps}", f"--round_seconds={args.round_seconds}"], env)
                  for s in SIDES)
    try:
      result = protocol.compare(sides, args.rounds, load_before=load_before)
    except RuntimeError as e:
      sys.exit(f"train [{name}]: {e}")
    info = result["info"]["o1jax"]
    tokens, flops = info["tokens"], info["flops_per_step"]
    figures = {}
    for side, s in result["sides"].items():
      rss = max(r["after"][side]["peak_rss_gib"] for r in result["rounds"])
      kernel = _kernel_time(result["rounds"], side)
      figures[side] = {"ms_per_step": 1e3 * s["median"], "tokens_per_s": tokens / s["median"],
                       "matmul_peak_fraction": flops / s["median"] / peak, "peak_rss_gib": rss, **kernel}
      print(f"[{name}] {side:8s} {1e3 * s['median']:8.1f} ms/step (rounds {1e3 * s['min']:.1f}-{1e3 * s['max']:.1f})"
            f", {tokens / s['median']:,.0f} tokens/s, {flops / s['median'] / peak:.3f} of the matmul peak, "
            f"peak RSS {rss:.2f} GiB" + (f", per round {kernel['system_s_per_round']:.2f} s in the kernel for "
                                         f"{kernel['minor_faults_per_round']:,.0f} page faults" if kernel else ""))
    print(f"[{name}] " + protocol.describe(result, "speed-up o1jax over PyTorch"))
    results[name] = {"tokens_per_step": tokens, "flops_per_step": flops, "figures": figures, "comparison": result}
  if args.json:
    # One file per dtype, named by its suite (launch/results/bench/train.json, train-bfloat16.json).
    protocol.write_json(args.json, "train" if args.dtype == "float32" else f"train-{args.dtype}", {
        "settings": {"finetune": "full", "dtype": args.dtype, "rounds": args.rounds, "steps": args.steps,
                     "round_seconds": args.round_seconds, "gguf": os.path.basename(gguf)},
        "matmul_peak_flops": peak, "configs": results})
