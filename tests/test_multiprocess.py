"""Multi-process training: 2 processes x 4 CPU devices with `jax.distributed` on 127.0.0.1 (gloo CPU collectives)
train tiny_cpu, checkpoint, are SIGKILLed, resume, and log the same losses as 1 process x 8 devices; SIGTERM to one
of the two makes both save the same step and exit 0, and the restart reproduces an uninterrupted pair's losses
bitwise.

Each process builds only its own rows of the batch (`Batcher(process_index, process_count)`), and the global
batch is their concatenation. Tolerance: the mesh, sharding and per-device work are identical in both runs; only
the cross-device reductions of the global batch (gloo's all-reduce between processes vs XLA's in-process one) may
add floats in another order, so values agree to fp32 reduction-order error, amplified over a few Adam steps:
rtol 1e-5 on the losses and accuracy (observed here: at most 7e-7 relative; printed with -s).
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from o1jax.retrieval import loading

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, EVERY, KILL_AFTER = 12, 4, 6
LOSSES = ("loss", "loss_ctr", "loss_gen", "acc_top1")
RTOL = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_jsonl(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start(tmp: pathlib.Path, name: str, devices: int, process: tuple[int, int, int] | None, cache: pathlib.Path
          ) -> subprocess.Popen:
  """`python -m o1jax.train` on tiny_cpu with `devices` CPU devices; `process` = (id, count, coordinator port)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  if process is not None:
    index, count, port = process
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
               JAX_PROCESS_ID=str(index))
  args = [f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", f"--config.train.steps={STEPS}", "--config.log.every=1",
          "--config.log.tensorboard_dir=", f"--config.log.jsonl={tmp / name}.jsonl",
          f"--config.checkpoint.dir={tmp / (name + '_ckpt')}", f"--config.checkpoint.every={EVERY}"]
  log = open(tmp / f"{name}.{process[0] if process else 0}.log", "a")  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, "-m", "o1jax.train", *args], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def tail(tmp: pathlib.Path, name: str) -> str:
  return "\n".join(p.read_text()[-2000:] for p in sorted(tmp.glob(f"{name}.*.log")))


def start_pair(tmp, name, cache) -> list[subprocess.Popen]:
  port = free_port()
  return [start(tmp, name, 4, (i, 2, port), cache) for i in range(2)]


def kill_all(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


def wait_all(procs, tmp, name, timeout=600) -> None:
  """Waits for every process to exit 0. When one fails the others would block in collectives: kill them."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.returncode not in (None, 0) for p in procs):
        break
      time.sleep(0.1)
  finally:
    kill_all(procs)
  assert [p.returncode for p in procs] == [0] * len(procs), tail(tmp, name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Reference (1 x 8) and multi-process (2 x 4) runs, the latter SIGKILLed after KILL_AFTER steps and resumed."""
  tmp = tmp_path_factory.mktemp("mp")
  cache = tmp / "xla_cache"
  reference = [start(tmp, "single", 8, None, cache)]
  wait_all(reference, tmp, "single")

  pair = start_pair(tmp, "multi", cache)
  try:
    while len(read_jsonl(tmp / "multi.jsonl")) < KILL_AFTER:
      if any(p.poll() is not None for p in pair):
        pytest.fail("a process of the pair ended before the kill:\n" + tail(tmp, "multi"))
      time.sleep(0.05)
  finally:
    kill_all(pair)  # SIGKILL: no chance to save, resume from the last complete checkpoint
  killed = read_jsonl(tmp / "multi.jsonl")

  resumed = start_pair(tmp, "multi", cache)
  wait_all(resumed, tmp, "multi")
  # The resumed run rewrites the log from its checkpoint's step on: its own lines are those from there.
  first = int(re.search(r"resumed from \S+ step (\d+)", (tmp / "multi.0.log").read_text()).group(1)) + 1
  return tmp, read_jsonl(tmp / "single.jsonl"), killed, [h for h in read_jsonl(tmp / "multi.jsonl") if h["step"] >= first]


def test_two_processes_resume_after_sigkill_with_the_losses_of_one_process(runs):
  tmp, single, killed, resumed = runs
  reference = {h["step"]: h for h in single}
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert [h["step"] for h in killed][:KILL_AFTER] == list(range(1, KILL_AFTER + 1))
  assert "jax.distributed: process 1 of 2" in (tmp / "multi.1.log").read_text()
  first = resumed[0]["step"]
  # Resumed from the last complete checkpoint (a multiple of EVERY) that the killed run reached.
  assert (first - 1) % EVERY == 0 and first - 1 <= killed[-1]["step"], (first, killed[-1]["step"])
  assert "resumed from" in (tmp / "multi.0.log").read_text()
  assert [h["step"] for h in resumed] == list(range(first, STEPS + 1))
  worst = {}
  for h in killed + resumed:
    for key in LOSSES:
      want, got = reference[h["step"]][key], h[key]
      worst[key] = max(worst.get(key, 0.0), abs(got - want) / max(abs(want), 1e-12))
      np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"step {h['step']} {key}")
  print(f"resumed at step {first}; largest relative differences, 2x4 vs 1x8: {worst}")


def test_the_pairs_checkpoint_loads_on_one_host_device_like_the_single_process_one(runs):
  tmp, *_ = runs
  _, multi, _ = loading.load_checkpoint_for_inference(tmp / "multi_ckpt", step=STEPS)
  _, single, _ = loading.load_checkpoint_for_inference(tmp / "single_ckpt", step=STEPS)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(multi)[0], jax.tree.leaves(single)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """An uninterrupted pair; a pair whose process 1 (not the coordinator) gets SIGTERM mid-run, and its restart.

  Each pair compiles afresh: jax writes the persistent compilation cache from process 0 only, and the two processes'
  cache keys differ, so with a shared cache process 0 would start its first collective a whole compile ahead of
  process 1, past gloo's 30 s rendezvous on a loaded machine."""
  tmp = tmp_path_factory.mktemp("preempt")
  wait_all(start_pair(tmp, "whole", tmp / "cache_whole"), tmp, "whole")

  pair = start_pair(tmp, "stopped", tmp / "cache_stopped")
  try:
    while len(read_jsonl(tmp / "stopped.jsonl")) < KILL_AFTER - 1:
      if any(p.poll() is not None for p in pair):
        pytest.fail("a process of the pair ended before the signal:\n" + tail(tmp, "stopped"))
      time.sleep(0.02)
    pair[1].send_signal(signal.SIGTERM)
    wait_all(pair, tmp, "stopped", timeout=300)
  finally:
    kill_all(pair)
  stopped = read_jsonl(tmp / "stopped.jsonl")
  logs = [(tmp / f"stopped.{i}.log").read_text() for i in range(2)]
  saved_steps = sorted(int(p.name) for p in (tmp / "stopped_ckpt").iterdir() if p.name.isdigit())

  wait_all(start_pair(tmp, "stopped", tmp / "cache_restart"), tmp, "stopped")
  return tmp, read_jsonl(tmp / "whole.jsonl"), stopped, logs, saved_steps, read_jsonl(tmp / "stopped.jsonl")


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_bitwise(preempted):
  tmp, whole, stopped, logs, saved_steps, final = preempted
  saved = [re.findall(r"(SIGTERM[\w ]*) at step (\d+): saved a checkpoint, exiting", log) for log in logs]
  # Process 1 got the signal; process 0 (the coordinator) learnt it from the vote after the same step.
  assert saved[1] == [("SIGTERM", saved[1][0][1])] and saved[0] == [("SIGTERM received by another process",
                                                                      saved[1][0][1])], logs
  step = int(saved[0][0][1])
  assert KILL_AFTER - 1 <= step < STEPS, step
  assert [h["step"] for h in stopped] == list(range(1, step + 1))
  assert saved_steps[-1] == step, saved_steps
  restart = (tmp / "stopped.0.log").read_text()[len(logs[0]):]
  assert f"resumed from {tmp / 'stopped_ckpt'} step {step}" in restart
  assert [h["step"] for h in final] == list(range(1, STEPS + 1))  # the log holds each step once
  reference = {h["step"]: h for h in whole}
  for h in final:
    for key in LOSSES:
      assert h[key] == reference[h["step"]][key], (h["step"], key)  # bitwise: same float
