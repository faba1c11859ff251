"""The device mesh, the one table mapping logical axes to mesh axes, and placement of state and batches.

Model code names only logical axes (`embed`, `mlp`, `activation_batch`, ...). `LOGICAL_RULES` below is the only
place in the project where the mesh axes `data`, `fsdp` and `tensor` are named:

  data    pure data parallelism: parameters replicated, batch split;
  fsdp    batch split too, and parameters sharded at rest on their `embed` dimension (gathered for compute by XLA);
  tensor  Megatron-style: heads, MLP hidden units and the vocabulary split.

Multi-slice (`config.mesh.dcn_data` slices over the data-center network, MaxText's dcn_data_parallelism): the
`data` axis is dcn_data x data long, slices outermost, and `fsdp`/`tensor` stay inside each slice, so only the
gradient reduction of the batch axes crosses slices (`mesh_utils.create_hybrid_device_mesh`). Devices that carry no
`slice_index` (CPU, GPU) take processes as slices.

LoRA adapters: the side of A and B that faces the model (`lora_fan`) is sharded over fsdp and tensor together,
else the one that divides it, so adapters and their Adam moments are split on every mesh that can; replicated,
they would sit whole on every device (Mistral-7B r32: 84M adapter parameters, 54M of them on the tensor side that
an fsdp-only mesh used to replicate).
Norm scales stay replicated: one vector per layer (< 0.01% of the parameters), which sharded would cost a gather
inside every layer.

The replication guard (`check_replication`) fails a run whose parameters, or whose adapters, are more than
MAX_REPLICATED_FRACTION (2%, by element count) fully replicated on a mesh whose fsdp or tensor axis could shard
them: a missing rule or a dimension that does not divide the mesh, caught before anything compiles.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# config.mesh keys besides the axes: how many slices the data axis spans over the data-center network.
DCN_DATA = "dcn_data"

# Ordered (logical axis, mesh axes) rules: for each dimension, the first rule for its logical axis whose mesh
# axes are still free in the spec and divide the dimension wins.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
    ("lora_fan", ("fsdp", "tensor")),
    ("lora_fan", "fsdp"),
    ("lora_fan", "tensor"),
)

# Parameters (or adapters) replicated on a mesh that could shard them cost memory on every device; more than this
# fraction of either (by element count) means a rule or a divisibility fallback went wrong.
MAX_REPLICATED_FRACTION = 0.02

# Environment variables that say this process is one of several (explicit JAX settings or a cluster launcher
# that jax.distributed.initialize detects by itself).
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                     "MEGASCALE_NUM_SLICES")


def initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment says several processes run; True if it did.

  Must run before anything touches a jax backend. Single-process runs (the default) do nothing.
  """
  if jax.distributed.is_initialized():
    return True
  detected = [name for name in _MULTIPROCESS_ENV if os.environ.get(name)]
  if not detected or (detected == ["SLURM_NTASKS"] and os.environ["SLURM_NTASKS"] == "1"):
    return False
  single_host = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) < 2
  if set(detected) <= {"TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES"} and single_host and int(
      os.environ.get("MEGASCALE_NUM_SLICES") or 1) < 2:
    return False
  if "JAX_COORDINATOR_ADDRESS" in detected:
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def dcn_data(mesh_config: Mapping[str, int]) -> int:
  """Slices the data axis spans (config.mesh.dcn_data; 1 when the key is absent, as in configs saved before it)."""
  return int(mesh_config.get(DCN_DATA, 1))


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes of the whole mesh from the config, `data` counting every slice's (dcn_data x data).

  data, fsdp and tensor are sizes within a slice; one may be -1, meaning all remaining devices of the slice. With
  dcn_data > 1 the slices' devices must fill the mesh exactly (one slice is one block of the hybrid mesh)."""
  slices = dcn_data(mesh_config)
  if slices < 1 or num_devices % slices:
    raise ValueError(f"config.mesh.{DCN_DATA}={slices}: must be >= 1 and divide the {num_devices} devices")
  per_slice = num_devices // slices
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  wild = [i for i, s in enumerate(sizes) if s == -1]
  bad = [f"{name}={s}" for name, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad or len(wild) > 1:
    raise ValueError(f"config.mesh: {', '.join(bad) or 'more than one axis is -1'}; sizes must be positive, "
                     "and at most one may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if wild:
    if per_slice % fixed:
      where = f"{per_slice} devices per slice" if slices > 1 else f"{num_devices} devices"
      raise ValueError(f"config.mesh: {where} are not divisible by the fixed axes' product {fixed}")
    sizes[wild[0]] = per_slice // fixed
  if math.prod(sizes) > per_slice or (slices > 1 and math.prod(sizes) != per_slice):
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices"
                     + (f" per slice; each of the {slices} slices has {per_slice}" if slices > 1 else
                        f"; {num_devices} available"))
  return (slices * sizes[0], sizes[1], sizes[2])


def _slice_key(devices: Sequence[jax.Device]) -> str:
  """What tells the slices apart: TPU devices carry `slice_index`; elsewhere each process stands for a slice."""
  return "slice_index" if hasattr(devices[0], "slice_index") else "process_index"


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of the config, over `devices` (default: all devices of all processes); with
  config.mesh.dcn_data > 1, a hybrid mesh whose data axis crosses the slices."""
  initialize_distributed()
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  slices, key = dcn_data(mesh_config), _slice_key(devices)
  found = len({getattr(d, key) for d in devices})
  if key == "slice_index" and found != slices:
    raise ValueError(f"config.mesh.{DCN_DATA}={slices}, but the devices form {found} slices: set it to {found}")
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices[:math.prod(shape)])
  if found != slices:
    raise ValueError(f"config.mesh.{DCN_DATA}={slices}: these devices carry no slice_index and come from {found} "
                     "processes; each process stands for one slice here")
  grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices,
                                              process_is_granule=key == "process_index")
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
  """The mesh and the logical-axis rules, both needed while tracing model code (it constrains activations by
  logical names): every jitted call of the model runs inside this."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def mesh_spec(logical: PartitionSpec | Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Mesh PartitionSpec of an array with these logical axis names.

  A dimension takes the first rule of its logical axis whose mesh axes (those of size > 1 not used by an earlier
  dimension) divide it; with none it stays replicated (the replication check reports it if it matters). Mesh axes
  of size 1 are dropped so that specs are canonical.
  """
  rules: dict[str, list[tuple[str, ...]]] = {}
  for name, axes in LOGICAL_RULES:
    rules.setdefault(name, []).append((axes,) if isinstance(axes, str) else tuple(axes or ()))
  used: set[str] = set()
  out = []
  for name, dim in zip(tuple(logical), shape):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule in o1jax.sharding.LOGICAL_RULES")
    chosen = None
    for axes in rules.get(name, []) if name is not None else []:
      axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
      if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
        chosen = axes
        break
    used.update(chosen or ())
    out.append(None if chosen is None else chosen[0] if len(chosen) == 1 else chosen)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def logical_to_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for `abstract_tree` (arrays or ShapeDtypeStructs) from a tree of logical PartitionSpecs."""
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh)), logical_tree,
                      abstract_tree, is_leaf=lambda s: isinstance(s, PartitionSpec))


def _dict_key_suffix(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a key path (an optimizer-state leaf ends with its parameter's path)."""
  names: list[str] = []
  for key in reversed(path):
    if not isinstance(key, jax.tree_util.DictKey):
      break
    names.append(str(key.key))
  return tuple(reversed(names))


def optimizer_state_shardings(abstract_opt_state: Any, param_shardings: Mapping[str, Any],
                              abstract_params: Mapping[str, Any], mesh: Mesh) -> Any:
  """Shardings of an optax state: a leaf shards like the parameter whose path it ends with and whose shape it
  has (Adam's moments); everything else (counts, scalars) is replicated.

  Args:
    param_shardings, abstract_params: {'params': tree, ('lora': tree)} of shardings and of shapes.
  """
  by_path, shapes = {}, {}
  for top, tree in param_shardings.items():
    by_path.update({(top,) + _dict_key_suffix(p): s for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]})
  for top, tree in abstract_params.items():
    shapes.update({(top,) + _dict_key_suffix(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]})
  rep = replicated(mesh)

  def leaf_sharding(path, x):
    suffix = _dict_key_suffix(path)
    return by_path[suffix] if suffix in by_path and shapes[suffix] == x.shape else rep

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of every batch array split over the batch axes (a prefix sharding: valid for any rank)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("activation_batch",), LOGICAL_RULES))


def batch_shards(mesh: Mesh) -> int:
  """How many ways batch rows are split: the global batch must be a multiple of this."""
  return math.prod(mesh.shape[a] for a in dict(LOGICAL_RULES)["activation_batch"])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _replicated_fraction(abstract_params: Any, shardings: Any, what: str, mesh: Mesh, max_fraction: float) -> float:
  leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  total = sum(int(np.prod(x.shape)) for _, x in leaves)
  offenders = [(int(np.prod(x.shape)), jax.tree_util.keystr(path))
               for (path, x), s in zip(leaves, jax.tree.leaves(shardings)) if s.is_fully_replicated]
  fraction = sum(n for n, _ in offenders) / total if total else 0.0
  if fraction > max_fraction:
    worst = ", ".join(f"{name} ({n:,})" for n, name in sorted(offenders, reverse=True)[:5])
    raise ValueError(f"{fraction:.1%} of {total:,} {what} are replicated on mesh {dict(mesh.shape)} (limit "
                     f"{max_fraction:.0%}); largest: {worst}. Check LOGICAL_RULES and that dimensions divide the "
                     "mesh axes.")
  return fraction


def check_replication(abstract_params: Any, shardings: Any, mesh: Mesh,
                      max_fraction: float = MAX_REPLICATED_FRACTION) -> float:
  """Fails when more than `max_fraction` (2% by default) of the parameters (by count), or of the LoRA adapters
  under a top-level 'lora' key (which a frozen 7B base would otherwise hide), are fully replicated on a mesh whose
  fsdp or tensor axis could shard them. Returns the replicated fraction of the whole tree."""
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return 0.0
  if isinstance(abstract_params, Mapping) and "lora" in abstract_params:
    _replicated_fraction(abstract_params["lora"], shardings["lora"], "LoRA adapter elements", mesh, max_fraction)
  return _replicated_fraction(abstract_params, shardings, "parameters", mesh, max_fraction)


def place(host_tree: Any, shardings: Any) -> Any:
  """Host arrays onto the mesh; each process materialises only the shards of its own devices."""
  def put(x, sharding):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x[index]))
  return jax.tree.map(put, host_tree, shardings)


def shard_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the batch (numpy) → global arrays sharded over the batch axes.

  With several processes, each passes only its own rows (in process order); the global batch is their
  concatenation.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for name, local in host_batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    if global_shape[0] % batch_shards(mesh):
      raise ValueError(f"batch field {name!r}: {global_shape[0]} global rows are not divisible by the "
                       f"{batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)}")
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out
