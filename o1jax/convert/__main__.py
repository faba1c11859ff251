"""Command line: convert checkpoints to a Hugging Face directory (the o1jax exchange format for now).

  # GGUF (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) -> HF directory, tokenizer included, with the O1 Embedder tokens:
  python -m o1jax.convert gguf-to-hf --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=smollm2-hf --add-special-tokens

  # HF directory -> HF directory through o1jax (checks every tensor), e.g. cast to bfloat16 in 2 GB shards:
  python -m o1jax.convert hf-to-hf --hf=Qwen2.5-0.5B --out=qwen-bf16 --dtype=bfloat16 --max-shard-bytes=2e9

Both write the directory atomically (temporary name, then rename) and refuse to replace one unless --overwrite.
The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` and `o1jax.convert.load_hf(out)`.
Bad input (a missing or damaged file, integer or non-finite weights, an existing --out) ends the command with one
line naming the file, the tensor or the option, and exit status 1.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys

from o1jax import tokenizer as tokenizers
from o1jax.convert import hf
from o1jax.convert.gguf import load_gguf
from o1jax.model.config import DTYPES


PROG = "python -m o1jax.convert"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  gguf_cmd = commands.add_parser("gguf-to-hf", help="GGUF file (llama architecture) -> HF directory")
  gguf_cmd.add_argument("--gguf", required=True, help="the .gguf file (its tokenizer is exported too)")
  hf_cmd = commands.add_parser("hf-to-hf", help="HF directory -> HF directory (re-export, optional dtype cast)")
  hf_cmd.add_argument("--hf", required=True, help="HF directory with config.json, safetensors and tokenizer")
  for cmd in (gguf_cmd, hf_cmd):
    cmd.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    cmd.add_argument("--dtype", default="float32", choices=DTYPES,
                     help="dtype of the exported tensors")
    cmd.add_argument("--add-special-tokens", action="store_true",
                     help="add <query> </query> <thought> <emb> and resize embeddings / LM head")
    cmd.add_argument("--max-shard-bytes", type=float, default=hf.DEFAULT_MAX_SHARD_BYTES,
                     help="split the weights into shards of at most this many bytes")
    cmd.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  return parser


def main(argv: list[str]) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  if not (math.isfinite(args.max_shard_bytes) and args.max_shard_bytes >= 1):
    parser.error(f"--max-shard-bytes must be a positive number of bytes, got {args.max_shard_bytes}")
  # Checked before the (long) conversion, and in the CLI's words; save_hf checks again when it writes.
  if pathlib.Path(args.out).exists() and not args.overwrite:
    raise FileExistsError(f"--out={args.out} exists (pass --overwrite to replace it)")
  # Loading straight into the export dtype keeps host memory at one copy of the model in that dtype.
  if args.command == "gguf-to-hf":
    cfg, params = load_gguf(args.gguf, param_dtype=args.dtype)
    tokenizer = tokenizers.load_tokenizer(args.gguf)
  else:
    cfg, params = hf.load_hf(args.hf, param_dtype=args.dtype)
    tokenizer = tokenizers.load_tokenizer(args.hf)
  if args.add_special_tokens:
    cfg, params, ids = tokenizers.add_special_tokens(tokenizer, cfg, params)
    print(f"special tokens: {ids}")
  out = hf.save_hf(cfg, params, args.out, tokenizer=tokenizer, max_shard_bytes=int(args.max_shard_bytes),
                   overwrite=args.overwrite)
  print(f"wrote {out} ({cfg.family}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, {args.dtype})")


def run(argv: list[str]) -> None:
  """The command line: bad input ends it with one line `python -m o1jax.convert: ...` and exit status 1."""
  try:
    main(argv)
  except (ValueError, OSError) as e:
    sys.exit(f"{PROG}: {' '.join(str(e).splitlines())}")


def cli() -> None:
  """`python -m o1jax.convert` and the `o1jax-convert` command."""
  run(sys.argv[1:])


if __name__ == "__main__":
  cli()
