"""`python -m o1jax.bench generate`: thought-generation throughput, o1jax vs transformers' `generate`, same run.

Both generate exactly `--new_tokens` tokens greedily for the same chat prompts from the same GGUF weights
(de-quantized to float32), so the two do identical work; the ratio is the number to read.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

import jax

QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "How do vaccines train the immune system?",
    "What causes ocean tides?", "Explain photosynthesis briefly.", "What is a prime number?",
    "How does a transistor work?", "Who wrote the theory of general relativity?",
]


def _default_gguf() -> str | None:
  shared = os.environ.get("O1JAX_SHARED")
  if shared:
    return str(pathlib.Path(shared) / "data/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf")
  return None


def _timed(fn, warmup, repeats: int) -> float:
  warmup()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.bench generate", description=__doc__)
  parser.add_argument("--gguf", default=_default_gguf(), help="SmolLM2-135M-Instruct GGUF (default: $O1JAX_SHARED)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  if not args.gguf:
    parser.error("--gguf is required when O1JAX_SHARED is not set")

  import torch
  import transformers

  from o1jax.convert.gguf import load_gguf
  from o1jax.generate import Generator
  from o1jax.tokenizer import load_tokenizer

  gguf_path = pathlib.Path(args.gguf)
  tokenizer = load_tokenizer(gguf_path)
  prompts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
             for i in range(args.batch)]
  cfg, params = load_gguf(gguf_path)
  # An id that never occurs: every row runs the full budget in both implementations.
  generator = Generator(cfg, params, eos_ids=(-1,))
  run_ours = lambda: generator.generate(prompts, max_new_tokens=args.new_tokens)
  ours = _timed(run_ours, run_ours, args.repeats)  # warm-up = the same shapes: compiles once

  torch.set_num_threads(os.cpu_count() or 1)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
  tokenizer.padding_side = "left"
  batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")

  def reference_generate(new_tokens):
    with torch.inference_mode():
      reference.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

  theirs = _timed(lambda: reference_generate(args.new_tokens), lambda: reference_generate(4), args.repeats)
  tokens = args.batch * args.new_tokens
  print(f"generate: SmolLM2-135M fp32, batch {args.batch}, {args.new_tokens} new tokens, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, median of {args.repeats}")
  print(f"  o1jax         {ours:8.2f} s  {tokens / ours:9.1f} tokens/s")
  print(f"  transformers  {theirs:8.2f} s  {tokens / theirs:9.1f} tokens/s")
  print(f"  ratio o1jax / transformers = {theirs / ours:.2f}x")
