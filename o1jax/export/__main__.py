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
  parser.add_argument("--out", required=True, help="Hugging Face directory to write (must not exist)")
  parser.add_argument("--step", type=int, default=None, help="saved step to export (default: the latest)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the exported weights")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  args = parser.parse_args(argv)
  out = export(args.checkpoint, args.out, args.step, args.dtype, args.overwrite)
  print(f"wrote {out}")


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"o1jax.export: {e}")
