"""The host memory allocator of runs on the CPU: mimalloc, set to keep freed memory for reuse.

XLA:CPU allocates each execution's temporaries afresh (a SmolLM2-135M training step: one 3.7 GB buffer), and glibc
hands an allocation that large back to the OS when it is freed, so every step faults ~960k pages in again and the
kernel zeroes each one: seconds of a ~9 s step, and more when another process ran in between. mimalloc, with arenas
that take objects of any size and keep freed memory for a while, reuses the same pages step after step. An
allocator has to be in place before the process starts (LD_PRELOAD), so the CLIs that run models re-execute
themselves under it (`reexec_on_cpu`) before they import anything heavy.

O1JAX_HOST_ALLOCATOR: unset, the CLIs choose (mimalloc on CPU runs, where the cmeel-mimalloc package is installed);
`system` keeps glibc's malloc; `mimalloc` says it is already chosen (the re-executed process gets it, so it never
re-executes twice). On accelerators the device allocator holds the step's buffers and the host's is left alone:
a run is a CPU run when JAX_PLATFORMS names `cpu` first, or, unset, when no accelerator plugin is installed.
"""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import sys
from typing import Mapping

SWITCH = "O1JAX_HOST_ALLOCATOR"
DISTRIBUTION = "cmeel-mimalloc"
LIBRARY = "cmeel.prefix/lib/libmimalloc.so"
# Arenas take objects of any size (by default objects over 2 GiB are mapped and unmapped on their own), and freed
# memory goes back to the OS after 30 s unused: a step reuses the last one's pages, and so does a bench round after
# the other side's turn. Never returning it (-1) let the CoSQA recipe's training grow from 14 GB until the kernel
# killed it at 24 GB: after some checkpoint saves the step's 3.7 GB block was placed anew while the old one stayed
# resident (SmolLM2-135M, a save every 2 steps, 12 steps: peak RSS 16.5 GB; with 30 s 10.5 GB; glibc 9.6 GB).
OPTIONS = {"MIMALLOC_ARENA_MAX_OBJECT_SIZE": "1TiB", "MIMALLOC_PURGE_DELAY": "30000"}
# Distributions that give jax a GPU or TPU backend (their names' prefixes).
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jax-tpu")


def library_path() -> str | None:
  """mimalloc's shared library from the installed cmeel-mimalloc package; None without it."""
  try:
    path = importlib.metadata.distribution(DISTRIBUTION).locate_file(LIBRARY)
  except importlib.metadata.PackageNotFoundError:
    return None
  return str(path) if os.path.isfile(path) else None


def environment(env: Mapping[str, str]) -> dict[str, str] | None:
  """`env` for a child process that runs under mimalloc (its options kept where `env` sets them); None where the
  package is missing, the platform is not Linux, or O1JAX_HOST_ALLOCATOR=system."""
  library = library_path()
  if sys.platform != "linux" or library is None or env.get(SWITCH) == "system":
    return None
  preload = env.get("LD_PRELOAD", "")
  return {**OPTIONS, **env, SWITCH: "mimalloc",
          "LD_PRELOAD": preload if library in preload.split(":") else ":".join(filter(None, (library, preload)))}


def runs_on_cpu(env: Mapping[str, str]) -> bool:
  """Whether jax will pick the CPU: JAX_PLATFORMS' first platform, or, unset, no accelerator plugin installed."""
  platforms = env.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
  return not any(name.lower().startswith(ACCELERATOR_PLUGINS) for name in names)


def cpu_environment(env: Mapping[str, str]) -> dict[str, str] | None:
  """`environment(env)` for a process that will run on the CPU; None for one that will not."""
  return environment(env) if runs_on_cpu(env) else None


def active() -> str:
  """The allocator this process runs under: `mimalloc` when its library is mapped, else `system`."""
  try:
    maps = pathlib.Path("/proc/self/maps").read_text()
  except OSError:
    return "system"
  return "mimalloc" if "libmimalloc" in maps else "system"


def reexec_on_cpu() -> None:
  """Replaces this process with the same command under mimalloc when it will run on the CPU and nothing chose an
  allocator yet; returns where it does not (the same process id either way, so launchers' signals still reach it)."""
  env = None if os.environ.get(SWITCH) else cpu_environment(os.environ)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
