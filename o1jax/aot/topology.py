"""Devices to compile for: Cloud TPU slices (through libtpu, no TPU attached) or this machine's CPU devices.

Topologies: Cloud TPU slice names (`v4-128`, `v5p-128`: TensorCores, 2 per chip; `v5e-256`, `v6e-64`: chips),
an explicit `v5p:4x4x4` chip grid, or `cpu-N` (N fake CPU devices of this machine, memory per device against
`--hbm_gib`, default the host's RAM split over the devices) for machines without libtpu.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from typing import Any

import jax

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: how slice names count it, its HBM and its dense bf16 peak (published figures)."""
  generation: str
  grid_dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  cores_per_chip_in_name: int  # v4-N and v5p-N count TensorCores (2 per chip); v5e-N and v6e-N count chips
  hbm_gib: float
  peak_tflops: float


CHIPS = {
    "v4": Chip("v4", 3, 2, 32, 275),
    "v5p": Chip("v5p", 3, 2, 95, 459),
    "v5e": Chip("v5e", 2, 1, 16, 197),
    "v6e": Chip("v6e", 2, 1, 32, 918),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A set of (possibly unattached) devices to compile for, and the memory each one has."""
  name: str
  devices: tuple[Any, ...]
  chips: int
  hbm_bytes_per_device: float
  peak_flops_per_chip: float | None  # None on CPU (no meaningful published peak)
  slices: int = 1


def chip_grid(chip: Chip, chips: int) -> tuple[int, ...]:
  """The chip grid Cloud TPU uses for a slice of `chips` chips: powers of two as even as possible, the larger
  exponents last (v5p-64 = 32 chips = 2x4x4, v5e-256 = 16x16); the 4-chip 3-D slice is 2x2x1."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: slices of {chip.generation} have a power-of-two chip count")
  if chip.grid_dims == 3 and chips == 4:
    return (2, 2, 1)
  if chip.grid_dims == 3 and chips < 4:
    raise ValueError(f"{chip.generation} slices have at least 4 chips ({chip.generation}-"
                     f"{4 * chip.cores_per_chip_in_name}); got {chips}")
  exponent = chips.bit_length() - 1
  base, extra = divmod(exponent, chip.grid_dims)
  return tuple(2**(base + (i >= chip.grid_dims - extra)) for i in range(chip.grid_dims))


def tpu_topology_name(name: str) -> tuple[Chip, str, int]:
  """(chip, `generation:AxBxC` name for get_topology_desc, chip count) of a slice name or an explicit grid."""
  explicit = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name)
  named = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  generation = (explicit or named).group(1) if (explicit or named) else None
  if generation not in CHIPS:
    raise ValueError(f"--topology={name!r}: expected a slice name like v5p-128, v5e-256, v4-64, v6e-64, a grid like "
                     f"v5p:4x4x4, or cpu-N; known TPU generations: {', '.join(CHIPS)}")
  chip = CHIPS[generation]
  if explicit:
    grid = tuple(int(d) for d in explicit.group(2).split("x"))
    if len(grid) != chip.grid_dims:
      raise ValueError(f"--topology={name!r}: {generation} grids have {chip.grid_dims} dimensions")
  else:
    count = int(named.group(2))
    if count % chip.cores_per_chip_in_name:
      raise ValueError(f"--topology={name!r}: {generation}-N counts TensorCores, {chip.cores_per_chip_in_name} "
                       "per chip; N must be a multiple of that")
    grid = chip_grid(chip, count // chip.cores_per_chip_in_name)
  return chip, f"{generation}:{'x'.join(map(str, grid))}", math.prod(grid)


def resolve_topology(name: str, hbm_gib: float | None = None, slices: int = 1) -> Topology:
  """Devices to compile for: `slices` slices of `name`. TPU names need the `libtpu` package; `cpu-N` uses this
  machine's CPU devices (one slice)."""
  if slices < 1:
    raise ValueError(f"--slices={slices}: must be >= 1")
  cpu = re.fullmatch(r"cpu-(\d+)", name)
  if cpu and slices > 1:
    raise ValueError(f"--topology={name} --slices={slices}: several slices are TPU topologies (CPU devices carry no "
                     "slice index)")
  if cpu:
    count = int(cpu.group(1))
    devices = jax.devices("cpu")
    if len(devices) != count:
      raise ValueError(f"--topology={name}: this process has {len(devices)} CPU devices (set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax starts)")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_device = hbm_gib * GIB if hbm_gib else host / count
    return Topology(name, tuple(devices), count, per_device, None)
  chip, grid_name, chips = tpu_topology_name(name)
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ValueError(f"--topology={name}: compiling for TPU needs the libtpu package "
                     "(pip install -r requirements-tpu.txt); or use --topology=cpu-N") from e
  if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    # No TPU attached, so nothing to guard: without this, libtpu's /tmp lockfile lets only one process on the
    # machine compile for TPU at a time.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=grid_name, num_slices=slices).devices)
  # Some generations expose one device per TensorCore (v4 without megacore): HBM is split between them.
  per_device = (hbm_gib or chip.hbm_gib) * GIB * chips * slices / len(devices)
  title = f"{name} ({grid_name}, {devices[0].device_kind})"
  return Topology(f"{slices} x {title}" if slices > 1 else title, devices, chips * slices, per_device,
                  chip.peak_tflops * 1e12, slices)
