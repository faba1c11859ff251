"""o1jax.host_allocator: CPU runs re-execute under mimalloc, which keeps the pages XLA:CPU's temporaries need
every execution (glibc maps them afresh: page faults, counted here by the kernel), with the same losses."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from o1jax import host_allocator

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A jitted function whose temporaries (64 MB each) are above glibc's largest mmap threshold (32 MB).
FAULTS = """
import resource, jax, jax.numpy as jnp
from o1jax import host_allocator
f = jax.jit(lambda x, w: (jnp.exp(x) @ w + jnp.cos(x).sum(axis=1, keepdims=True)).sum())
x, w = jnp.ones((16384, 1024)), jnp.ones((1024, 8))
f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, w).block_until_ready()
print(host_allocator.active(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def child_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.SWITCH)}
  return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def test_environment_preloads_the_packaged_library():
  library = host_allocator.library_path()
  assert library is not None and pathlib.Path(library).name == "libmimalloc.so"  # a requirement: installed
  env = host_allocator.environment({"LD_PRELOAD": "/opt/other.so", "MIMALLOC_PURGE_DELAY": "100"})
  assert env["LD_PRELOAD"] == f"{library}:/opt/other.so"
  assert env["MIMALLOC_PURGE_DELAY"] == "100"  # the caller's option wins
  assert env["MIMALLOC_ARENA_MAX_OBJECT_SIZE"] == host_allocator.OPTIONS["MIMALLOC_ARENA_MAX_OBJECT_SIZE"]
  assert env[host_allocator.SWITCH] == "mimalloc"
  assert host_allocator.environment(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # not preloaded twice
  assert host_allocator.environment({host_allocator.SWITCH: "system"}) is None


@pytest.mark.parametrize("platforms, cpu", [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("tpu,cpu", False)])
def test_runs_on_cpu_reads_jax_platforms(platforms, cpu):
  assert host_allocator.runs_on_cpu({"JAX_PLATFORMS": platforms}) is cpu


def test_mimalloc_keeps_the_temporaries_pages():
  """Five executions of the same program: glibc faults its 64 MB temporary in every time, mimalloc once."""
  def faults(env):
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    return out[0], int(out[1])

  system = faults(child_env())
  mimalloc = faults(host_allocator.environment(child_env()))
  assert system[0] == "system" and mimalloc[0] == "mimalloc"
  assert system[1] > 5 * 64 * 2**20 // 4096 // 2, system  # at least half the pages, five times
  assert mimalloc[1] < system[1] // 50, (mimalloc, system)


def test_train_cli_reexecutes_under_mimalloc_with_the_same_losses(tmp_path):
  def train(name, **extra):
    jsonl = tmp_path / f"{name}.jsonl"
    proc = subprocess.run([sys.executable, "-m", "o1jax.train", f"--config={ROOT / 'configs' / 'tiny_cpu.py'}",
                           "--config.train.steps=4", "--config.log.every=1", "--config.log.tensorboard_dir=",
                           f"--config.log.jsonl={jsonl}", "--config.checkpoint.dir="],
                          cwd=ROOT, env=child_env(**extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    allocator = proc.stderr.split("host allocator: ")[1].split()[0]
    return allocator, [json.loads(line)["loss"] for line in jsonl.read_text().splitlines()]

  chosen, losses = train("auto")
  system, system_losses = train("system", **{host_allocator.SWITCH: "system"})
  assert (chosen, system) == ("mimalloc", "system")
  assert losses == system_losses and len(losses) == 4
