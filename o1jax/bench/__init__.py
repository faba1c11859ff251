"""Benchmarks: `python -m o1jax.bench {generate,train,data,eval,accel} [--json=PATH]`; A/B comparisons follow
`o1jax.bench.protocol` (each side its own process, interleaved rounds, median, spread and a verdict), and
`python -m o1jax.bench.render` renders the README's table from the committed JSON in launch/results/bench."""
