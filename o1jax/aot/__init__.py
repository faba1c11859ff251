"""Ahead-of-time fit reports: `python -m o1jax.aot` (CLI), `fit` (the report), `topology` (the devices)."""
