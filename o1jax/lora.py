"""LoRA adapters as a separate parameter tree, applied without touching the model code.

For a target projection with (stacked) kernel W [layers, in, out], the adapter is A [layers, in, r] and
B [layers, r, out] (B starts at zero, so an untrained adapter changes nothing), and the projection computes

  y = x W (+ bias) + (alpha / r) * dropout(x) A B          (dropout on the LoRA input, as in PEFT)

A Flax method interceptor adds the second term to the target `nn.Dense` calls. The adapter leaves travel inside
the parameter tree given to `Decoder.apply` (next to `kernel`), so the model's layer scan slices them per layer
like every other parameter; with dropout, per-layer dropout keys travel the same way. Export merges the adapter
into the kernel (`merge`), so a LoRA run exports as a plain Hugging Face checkpoint.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# Target projection -> its parent module in the decoder layer.
TARGET_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
A, B, KEY = "lora_a", "lora_b", "lora_dropout_key"
# Every projection an adapter can target (METHOD §4 targets all seven).
TARGETS = tuple(TARGET_PARENTS)


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
  unknown = [t for t in targets if t not in TARGET_PARENTS]
  if unknown or not targets:
    raise ValueError(f"config.train.lora.targets: unknown {unknown} (or empty); choose from "
                     f"{', '.join(TARGET_PARENTS)}")
  return tuple(targets)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapters of rank `rank` on `targets`, scaled by alpha / rank, dropout on their input (METHOD §4)."""
  rank: int = 32
  alpha: float = 64.0
  dropout: float = 0.1
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    object.__setattr__(self, "targets", check_targets(list(self.targets)))
    if self.rank < 1 or not 0 <= self.dropout < 1:
      raise ValueError(f"LoRA rank={self.rank} must be >= 1 and dropout={self.dropout} in [0, 1)")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> LoraConfig:
    """From `config.train.lora` (a ConfigDict, or its JSON in a checkpoint's run files)."""
    return cls(rank=int(values["rank"]), alpha=float(values["alpha"]), dropout=float(values["dropout"]),
               targets=tuple(values["targets"]))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _kernel(params: Mapping[str, Any], target: str) -> Any:
  return params["layers"][TARGET_PARENTS[target]][target]["kernel"]


def init(params: Mapping[str, Any], lora_cfg: LoraConfig, rng: jax.Array) -> dict:
  """Adapters for the targets: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default), B = 0; kernel's dtype."""
  rank = lora_cfg.rank
  tree: dict = {}
  for i, target in enumerate(lora_cfg.targets):
    layers, fan_in, fan_out = _kernel(params, target).shape
    dtype = _kernel(params, target).dtype
    bound = fan_in**-0.5
    a = jax.random.uniform(jax.random.fold_in(rng, i), (layers, fan_in, rank), jnp.float32, -bound, bound)
    tree.setdefault("layers", {}).setdefault(TARGET_PARENTS[target], {})[target] = {
        A: a.astype(dtype), B: jnp.zeros((layers, rank, fan_out), dtype)}
  return tree


def logical_axes(model_axes: Mapping[str, Any], lora_cfg: LoraConfig) -> dict:
  """Logical axes of the adapter tree: A's input and B's output dimension are `lora_fan` (sharded over fsdp and
  tensor where they divide it: o1jax.sharding), the rank dimension `lora_rank` (replicated), layers like the
  kernel's."""
  tree: dict = {}
  for target in lora_cfg.targets:
    layers = tuple(_kernel(model_axes, target))[0]
    tree.setdefault("layers", {}).setdefault(TARGET_PARENTS[target], {})[target] = {
        A: PartitionSpec(layers, "lora_fan", "lora_rank"), B: PartitionSpec(layers, "lora_rank", "lora_fan")}
  return tree


def with_adapters(params: Mapping[str, Any], lora: Mapping[str, Any], dropout_rng: jax.Array | None = None) -> dict:
  """The parameter tree for `Decoder.apply`: `params` with each target's A, B (and dropout keys) beside its kernel."""
  layers = {parent: dict(modules) for parent, modules in params["layers"].items()}
  for i, (parent, modules) in enumerate(sorted(lora["layers"].items())):
    for j, (target, adapter) in enumerate(sorted(modules.items())):
      leaves = dict(layers[parent][target], **adapter)
      if dropout_rng is not None:
        num_layers = adapter[A].shape[0]
        keys = jax.random.split(jax.random.fold_in(dropout_rng, 16 * i + j), num_layers)
        leaves[KEY] = jax.random.key_data(keys)
      layers[parent][target] = leaves
  return {**params, "layers": layers}


@contextlib.contextmanager
def applied(lora_scale: float, dropout_rate: float) -> Iterator[None]:
  """Within this context, every `nn.Dense` whose parameters carry an adapter adds its LoRA term.

  Dropout is active only when the parameters carry dropout keys (training), never at evaluation.
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
        or not module.has_variable("params", A)):
      return next_fun(*args, **kwargs)
    (x,) = args
    y = next_fun(*args, **kwargs)
    a, b = module.get_variable("params", A), module.get_variable("params", B)
    h = x
    if dropout_rate > 0 and module.has_variable("params", KEY):
      key = jax.random.wrap_key_data(module.get_variable("params", KEY))
      keep = jax.random.bernoulli(key, 1.0 - dropout_rate, x.shape)
      h = jnp.where(keep, x / (1.0 - dropout_rate), jnp.zeros_like(x))
    dtype = y.dtype
    delta = (h.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
    return y + (lora_scale * delta).astype(dtype)

  with nn.intercept_methods(interceptor):
    yield


def merge(params: Mapping[str, Any], lora: Mapping[str, Any], lora_cfg: LoraConfig) -> dict:
  """Base parameters with W + (alpha / r) A B folded into each target kernel (for export and evaluation)."""
  s = lora_cfg.scale
  layers = {parent: dict(modules) for parent, modules in params["layers"].items()}
  for parent, modules in lora["layers"].items():
    for target, adapter in modules.items():
      kernel = layers[parent][target]["kernel"]
      delta = jnp.einsum("lir,lro->lio", adapter[A].astype(jnp.float32), adapter[B].astype(jnp.float32))
      layers[parent][target] = {**layers[parent][target], "kernel": (kernel.astype(jnp.float32) + s * delta)
                                .astype(kernel.dtype)}
  return {**params, "layers": layers}
