"""Train-step benchmark: `python -m o1jax.bench train [--gguf=FILE] [--steps=N]`.

For tiny_cpu and (given the GGUF file, or O1JAX_SHARED) smollm2_135m, both with full fine-tuning: step time,
tokens/s, achieved FLOP/s / the fp32 matmul peak measured at start-up, peak host memory; then the same step
(same weights, batch, lengths, losses and AdamW update) written with transformers' PyTorch `LlamaForCausalLM`,
timed in the same run, and the ratio. (Compiling a config's step from shapes alone, e.g. Mistral-7B on 8 fake
CPU devices, with XLA's memory analysis: `python -m o1jax.aot --config=... --topology=cpu-8`.)
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from o1jax import config as o1config, sharding
from o1jax.convert import save_hf
from o1jax.data import batching
from o1jax.training import sources
from o1jax.training.flops import measured_matmul_peak
from o1jax.training.trainer import Trainer


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _median_time(fn, steps: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def torch_contrastive_step(model, optimizer, batch, *, tau: float, group_size: int, w_ctr: float, w_gen: float,
                           clip_norm: float, autocast_dtype=None) -> float:
  """One o1jax step in PyTorch on a transformers `*ForCausalLM` (LoRA layers injected by peft or not): one query
  pass (L_gen + `<emb>` pooling), documents through the backbone, global InfoNCE over fp32 cosine scores / tau,
  w_ctr * L_ctr + w_gen * L_gen, clipping of the trainable parameters, the optimizer's update. `batch` holds the
  batch contract's fields as int64 tensors on the model's device; `autocast_dtype` (e.g. torch.bfloat16) runs
  the forward and backward under autocast (fp32 master weights, bf16 compute). Returns the loss (a host sync)."""
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


def torch_step_fn(model_dir: str, config, batch: dict[str, np.ndarray]):
  """The o1jax step in PyTorch `LlamaForCausalLM` (fp32, full fine-tuning): `torch_contrastive_step` on the
  weights saved in `model_dir`."""
  t, o = config.train, config.optim
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  b = {k: torch.from_numpy(v).long() for k, v in batch.items()}
  return lambda: torch_contrastive_step(model, opt, b, tau=t.tau, group_size=t.group_size, w_ctr=t.w_ctr,
                                        w_gen=t.w_gen, clip_norm=o.clip_norm)


def bench_config(name: str, overrides: list[str], steps: int, peak: float) -> None:
  config = o1config.load([f"--config=configs/{name}.py", "--config.train.finetune=full",
                          "--config.checkpoint.dir=", *overrides])
  with config.unlocked():
    config.mesh.update(data=1, fsdp=-1, tensor=1)
  o1config.validate(config, jax.device_count())
  run = o1config.settings(config)
  model_cfg, params, tokenizer, special = sources.build_model(run.model, run.data)
  host = batching.Batcher(sources.load_records(run.data), tokenizer, special, run.batch).batch(0)
  trainer = Trainer(model_cfg, run.trainer, sharding.make_mesh(config.mesh), special)
  state = trainer.init_state(jax.random.key(run.seed), params)
  batch = trainer.shard_batch(host)
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = trainer.step(holder["state"], batch)
    jax.block_until_ready(metrics)

  rss_before = _rss_gib()
  jax_time = _median_time(jax_step, steps)
  rss_jax = _rss_gib()
  shape = run.batch.shape()
  tokens, flops = shape.tokens(), trainer.flops_per_step(shape)
  print(f"[{name}] o1jax: {jax_time * 1e3:.1f} ms/step, {tokens / jax_time:,.0f} tokens/s, "
        f"{flops / jax_time / 1e9:.2f} GFLOP/s = {flops / jax_time / peak:.3f} of the matmul peak, "
        f"peak RSS {rss_jax:.2f} GiB (+{rss_jax - rss_before:.2f} in the step loop)")
  if model_cfg.family != "llama":
    return
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "model")
    save_hf(model_cfg, jax.device_get(holder["state"]["params"]), model_dir)
    torch_step = torch_step_fn(model_dir, config, host)
  torch_time = _median_time(torch_step, steps)
  print(f"[{name}] PyTorch LlamaForCausalLM ({torch.get_num_threads()} threads): {torch_time * 1e3:.1f} ms/step, "
        f"{tokens / torch_time:,.0f} tokens/s, {flops / torch_time / peak:.3f} of the matmul peak, "
        f"peak RSS {_rss_gib():.2f} GiB")
  print(f"[{name}] o1jax speed-up over PyTorch: {torch_time / jax_time:.2f}x")


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.bench train")
  parser.add_argument("--gguf", default="", help="SmolLM2-135M-Instruct GGUF file (default: from O1JAX_SHARED)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median reported)")
  args = parser.parse_args(argv)
  peak = measured_matmul_peak()
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  bench_config("tiny_cpu", [], args.steps, peak)
  gguf = args.gguf or (os.path.join(os.environ["O1JAX_SHARED"], "data", "smollm2-135m-instruct-gguf",
                                    "SmolLM2-135M-Instruct.Q4_1.gguf") if os.environ.get("O1JAX_SHARED") else "")
  if gguf:
    bench_config("smollm2_135m", [f"--config.model.path={gguf}"], args.steps, peak)
  else:
    print("smollm2_135m skipped: pass --gguf=FILE or set O1JAX_SHARED")
