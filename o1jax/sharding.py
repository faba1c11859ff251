"""The device mesh, the one table mapping logical axes to mesh axes, and placement of state and batches.

Model code names only logical axes (`embed`, `mlp`, `activation_batch`, ...). `LOGICAL_RULES` below is the only
place in the project where the mesh axes `data`, `fsdp` and `tensor` are named:

  data    pure data parallelism: parameters replicated, batch split;
  fsdp    batch split too, and parameters sharded at rest on their `embed` dimension (gathered for compute by XLA);
  tensor  Megatron-style: heads, MLP hidden units and the vocabulary split.
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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Ordered (logical axis, mesh axes) rules: the first rule whose mesh axes are still free in a spec wins.
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
)

# Parameters replicated on a mesh that could shard them cost memory on every device; more than this fraction
# (by element count) means a rule or a divisibility fallback went wrong.
MAX_REPLICATED_FRACTION = 0.02

# Environment variables that say this process is one of several (explicit JAX settings or a cluster launcher
# that jax.distributed.initialize detects by itself).
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment says several processes run; True if it did.

  Must run before anything touches a jax backend. Single-process runs (the default) do nothing.
  """
  if jax.distributed.is_initialized():
    return True
  detected = [name for name in _MULTIPROCESS_ENV if os.environ.get(name)]
  if not detected or (detected == ["SLURM_NTASKS"] and os.environ["SLURM_NTASKS"] == "1"):
    return False
  if "TPU_WORKER_HOSTNAMES" in detected and len(os.environ["TPU_WORKER_HOSTNAMES"].split(",")) < 2:
    return False
  if "JAX_COORDINATOR_ADDRESS" in detected:
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes from the config; one axis may be -1, meaning all remaining devices."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  wild = [i for i, s in enumerate(sizes) if s == -1]
  bad = [f"{name}={s}" for name, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad or len(wild) > 1:
    raise ValueError(f"config.mesh: {', '.join(bad) or 'more than one axis is -1'}; sizes must be positive, "
                     "and at most one may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if wild:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes' product {fixed}")
    sizes[wild[0]] = num_devices // fixed
  if math.prod(sizes) > num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                     f"{num_devices} available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of the config, over `devices` (default: all devices of all processes)."""
  initialize_distributed()
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:math.prod(shape)])


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
  """The mesh and the logical-axis rules, both needed while tracing model code (it constrains activations by
  logical names): every jitted call of the model runs inside this."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def mesh_spec(logical: PartitionSpec | Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Mesh PartitionSpec of an array with these logical axis names.

  A dimension not divisible by its mesh axes stays replicated (the replication check reports it if it matters);
  a mesh axis of size 1 is dropped so that specs are canonical.
  """
  rules = dict(LOGICAL_RULES)
  used: set[str] = set()
  out = []
  for name, dim in zip(tuple(logical), shape):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule in o1jax.sharding.LOGICAL_RULES")
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
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


def check_replication(abstract_params: Any, shardings: Any, mesh: Mesh,
                      max_fraction: float = MAX_REPLICATED_FRACTION) -> float:
  """Fails when more than `max_fraction` of the parameters (by count) are fully replicated on a mesh whose
  fsdp or tensor axis could shard them. Returns the replicated fraction."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(shardings)
  total = sum(int(np.prod(x.shape)) for _, x in leaves)
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1 or total == 0:
    return 0.0
  offenders = [(int(np.prod(x.shape)), jax.tree_util.keystr(path))
               for (path, x), s in zip(leaves, flat_shardings) if s.is_fully_replicated]
  fraction = sum(n for n, _ in offenders) / total
  if fraction > max_fraction:
    worst = ", ".join(f"{name} ({n:,})" for n, name in sorted(offenders, reverse=True)[:5])
    raise ValueError(f"{fraction:.1%} of {total:,} parameters are replicated on mesh {dict(mesh.shape)} "
                     f"(limit {max_fraction:.0%}); largest: {worst}. Check LOGICAL_RULES and that dimensions "
                     "divide the mesh axes.")
  return fraction


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
