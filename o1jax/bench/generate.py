"""`python -m o1jax.bench generate`: thought-generation throughput, o1jax vs transformers' `generate`.

Both generate exactly `--new_tokens` tokens greedily for the same chat prompts from the same GGUF weights
(de-quantized to float32), so the two do identical work. Each side runs in its own process, warmed up, and the
two are timed in turns over `--rounds` rounds (`o1jax.bench.protocol`); the ratio is the number to read, and the
verdict says whether the machine was quiet enough for it. On a CPU the o1jax worker also times its decoding
step's matmuls alone (`matmul_floor`): the least a token can cost with these kernels, so how much of a token's time
the rest of the step takes. `--json=PATH` writes every figure.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from o1jax import host_allocator
from o1jax.bench import protocol

QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "How do vaccines train the immune system?",
    "What causes ocean tides?", "Explain photosynthesis briefly.", "What is a prime number?",
    "How does a transistor work?", "Who wrote the theory of general relativity?",
]
SIDES = ("o1jax", "transformers")


def _default_gguf() -> str | None:
  shared = os.environ.get("O1JAX_SHARED")
  if shared:
    return str(pathlib.Path(shared) / "data/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf")
  return None


def _prompts(tokenizer, batch: int) -> list[list[int]]:
  return [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
          for i in range(batch)]


PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def decode_matmuls(x, layers, head):
  """A decoding step's matmuls alone, in its order: `layers` holds each layer's PROJECTIONS kernels."""
  import jax
  import jax.numpy as jnp
  for q, k, v, o, gate, up, down in layers:
    keys_values = jnp.sum(x @ k) + jnp.sum(x @ v)
    x = x + (x @ q) @ o + 0.0 * keys_values  # XLA does not fold x * 0.0 (NaN), so the key and value reads stay
    x = x + (jax.nn.silu(x @ gate) * (x @ up)) @ down
  return x @ head


def decode_kernels(params) -> tuple[list[list], object]:
  """`decode_matmuls`' layers and head from the decoding layout's parameters (`layers_0`, ... and `lm_head`)."""
  layers = [[params[f"layers_{i}"][block][proj]["kernel"] for block, proj in PROJECTIONS]
            for i in range(sum(name.startswith("layers_") for name in params))]
  return layers, params["lm_head"]["kernel"]


def matmul_floor(params, batch: int, repeats: int = 10) -> dict:
  """The least time a decoding step can take with this jax's matmul kernels: `decode_matmuls` on [batch, hidden]
  rows of `params` (the decoding layout), with no attention, norm, cache or sampling. Returns its milliseconds
  (the best of `repeats`), the weight bytes it reads and the rate."""
  import jax
  import jax.numpy as jnp
  layers, head = decode_kernels(params)
  step = jax.jit(decode_matmuls)
  x = jnp.ones((batch, head.shape[0]), head.dtype)
  jax.block_until_ready(step(x, layers, head))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(x, layers, head))
    seconds.append(time.perf_counter() - start)
  weight_bytes = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves((layers, head)))
  return {"ms": 1e3 * min(seconds), "weight_gb": weight_bytes / 1e9, "gb_per_s": weight_bytes / min(seconds) / 1e9}


def o1jax_side(args) -> protocol.Workload:
  import jax
  from o1jax.convert.gguf import load_gguf
  from o1jax.generate import Generator
  from o1jax.tokenizer import load_tokenizer
  gguf_path = pathlib.Path(args.gguf)
  prompts = _prompts(load_tokenizer(gguf_path), args.batch)
  cfg, params = load_gguf(gguf_path)
  # An id that never occurs: every row runs the full budget in both implementations.
  generator = Generator(cfg, params, eos_ids=(-1,))
  info = {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
  if jax.default_backend() == "cpu":  # the layout matmul_floor reads is the CPU one
    info["matmul_floor"] = matmul_floor(generator.decoding[1], args.batch)
  return protocol.Workload(run=lambda: generator.generate(prompts, max_new_tokens=args.new_tokens), info=info)


def transformers_side(args) -> protocol.Workload:
  import torch
  import transformers
  from o1jax.tokenizer import load_tokenizer
  gguf_path = pathlib.Path(args.gguf)
  tokenizer = load_tokenizer(gguf_path)
  prompts = _prompts(tokenizer, args.batch)
  torch.set_num_threads(os.cpu_count() or 1)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
  tokenizer.padding_side = "left"
  batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")

  def generate(new_tokens):
    with torch.inference_mode():
      reference.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

  return protocol.Workload(run=lambda: generate(args.new_tokens), warmup=lambda: generate(4),
                           info={"threads": torch.get_num_threads()})


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.bench generate", description=__doc__)
  parser.add_argument("--gguf", default=_default_gguf(), help="SmolLM2-135M-Instruct GGUF (default: $O1JAX_SHARED)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each side once per round)")
  parser.add_argument("--steps", type=int, default=1, help="timed generations per side per round (median)")
  parser.add_argument("--json", default="", help="write every figure, the machine and the verdict here")
  parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if not args.gguf:
    parser.error("--gguf is required when O1JAX_SHARED is not set")
  if not os.path.isfile(args.gguf):
    parser.error(f"--gguf: no such file: {args.gguf}")
  if min(args.batch, args.new_tokens, args.rounds, args.steps) < 1:
    parser.error("--batch, --new_tokens, --rounds and --steps must be >= 1")
  if args.worker:
    side = o1jax_side if args.worker == "o1jax" else transformers_side
    protocol.serve(lambda: side(args), args.steps)
    return

  common = [f"--gguf={args.gguf}", f"--batch={args.batch}", f"--new_tokens={args.new_tokens}",
            f"--steps={args.steps}"]
  env = host_allocator.cpu_environment(os.environ)  # both sides: the ratio compares the frameworks, not mallocs
  sides = tuple(protocol.Side(s, [sys.executable, "-m", "o1jax.bench", "generate", f"--worker={s}", *common], env)
                for s in SIDES)
  try:
    result = protocol.compare(sides, args.rounds)
  except RuntimeError as e:
    sys.exit(f"generate: {e}")
  tokens = args.batch * args.new_tokens
  print(f"generate: SmolLM2-135M fp32, batch {args.batch}, {args.new_tokens} new tokens, o1jax on "
        f"{result['info']['o1jax']['devices']}, {args.rounds} rounds x {args.steps}")
  for name, s in result["sides"].items():
    print(f"  {name:13s} {s['median']:8.2f} s  {tokens / s['median']:9.1f} tokens/s  (rounds {s['min']:.2f}-"
          f"{s['max']:.2f} s)")
  print("  " + protocol.describe(result, "speed-up o1jax over transformers"))
  floor = result["info"]["o1jax"].get("matmul_floor")
  if floor:
    print(f"  o1jax {1e3 * result['sides']['o1jax']['median'] / args.new_tokens:.1f} ms per new token (prefill "
          f"included); its step's matmuls alone: {floor['ms']:.1f} ms ({floor['gb_per_s']:.1f} GB/s of "
          f"{floor['weight_gb']:.2f} GB of weights)")
  if args.json:
    protocol.write_json(args.json, "generate", {
        "settings": {"model": "SmolLM2-135M-Instruct (GGUF, de-quantized to fp32)", "gguf": os.path.basename(args.gguf),
                     "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds, "steps": args.steps},
        "tokens_per_call": tokens,
        "tokens_per_s": {name: tokens / s["median"] for name, s in result["sides"].items()},
        "comparison": result})
