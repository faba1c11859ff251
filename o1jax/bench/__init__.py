"""Benchmarks: `python -m o1jax.bench {generate,train,data,eval}`; each prints ratios measured in the same run."""
