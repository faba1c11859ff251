"""Dispatch `python -m o1jax.bench NAME [args]` to `o1jax.bench.NAME.main(args)`."""
import importlib
import sys

SUITES = ("generate", "train", "data", "eval", "accel")


def main(argv: list[str]) -> None:
  if not argv or argv[0] not in SUITES:
    sys.exit(f"usage: python -m o1jax.bench {{{','.join(SUITES)}}} [options]")
  importlib.import_module(f"o1jax.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
  main(sys.argv[1:])
