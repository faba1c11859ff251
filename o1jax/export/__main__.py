"""`python -m o1jax.export --checkpoint=DIR --out=HF_DIR [--step=N]`: a trained retriever as a Hugging Face model.

See `o1jax.export` for what the directory holds.
"""
from __future__ import annotations

import argparse
import sys

from o1jax.export import export
from o1jax.model.config import DTYPES


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m o1jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="checkpoint directory of python -m o1jax.train")
  parser.add_argument("--out", required=True, help="directory to write (must not exist unless --overwrite)")
  parser.add_argument("--step", type=int, default=None, help="saved step to export (default: the latest)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the exported weights")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if it is an earlier export (never the checkpoint or a directory around it)")
  args = parser.parse_args(argv)
  out = export(args.checkpoint, args.out, args.step, args.dtype, args.overwrite)
  print(f"wrote {out}")


def cli() -> None:
  """`python -m o1jax.export` and the `o1jax-export` script: bad input ends with one line and exit status 1."""
  try:
    main(sys.argv[1:])
  except (OSError, ValueError) as e:
    sys.exit(f"o1jax.export: {e}")


if __name__ == "__main__":
  cli()
