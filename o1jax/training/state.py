"""The train state {params, (lora), opt_state, step, rng}: its initialisation and its shardings.

Abstract-state-first (MaxText): `jax.eval_shape` of the initialiser gives the state's shapes, the logical axes
give its shardings, and the state is then built by one jitted call directly on the mesh, so the full model never
sits on one device. The same abstract state with its shardings (`checkpoint.abstract_like`) is the target of a
checkpoint restore and the input of AOT compilation.
"""
from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from o1jax import lora, sharding
from o1jax.model import ModelConfig, init_params, logical_axes
from o1jax.training import trainable as trainable_lib


def initializer(model_cfg: ModelConfig, lora_cfg: lora.LoraConfig | None,
                optimizer: optax.GradientTransformation) -> Callable[[jax.Array, Any], dict]:
  """`init(rng key data, params or None) -> state`: random parameters when None; adapters and optimizer state
  from the same key, each from its own fold."""
  def init(rng_data: jax.Array, params: Any | None) -> dict:
    rng = jax.random.wrap_key_data(rng_data)
    if params is None:
      params = init_params(model_cfg, jax.random.fold_in(rng, 0))
    state = {"params": params}
    if lora_cfg is not None:
      state["lora"] = lora.init(params, lora_cfg, jax.random.fold_in(rng, 1))
    state["opt_state"] = optimizer.init(trainable_lib.trainable_part(state))
    state["step"] = jnp.zeros((), jnp.int32)
    state["rng"] = jax.random.key_data(jax.random.fold_in(rng, 2))
    return state
  return init


def abstract_params(model_cfg: ModelConfig) -> Any:
  return jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))


def param_shardings(model_cfg: ModelConfig, mesh: Mesh) -> Any:
  """A NamedSharding per model parameter, by its logical axes: the trainer's, and what weights are loaded into."""
  return sharding.logical_to_shardings(logical_axes(model_cfg), abstract_params(model_cfg), mesh)


def abstract_state(init: Callable[[jax.Array, Any], dict], params: Any) -> dict:
  key_spec = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32)
  return jax.eval_shape(init, key_spec, params)


def shardings(abstract: dict, model_cfg: ModelConfig, lora_cfg: lora.LoraConfig | None, mesh: Mesh) -> dict:
  """Parameters by their logical axes; optimizer moments like the parameter they belong to; scalars replicated."""
  out = {"params": param_shardings(model_cfg, mesh)}
  if lora_cfg is not None:
    model_axes = logical_axes(model_cfg)
    out["lora"] = sharding.logical_to_shardings(lora.logical_axes(model_axes, lora_cfg), abstract["lora"], mesh)
  at_rest = trainable_lib.trainable_part(abstract)
  out["opt_state"] = sharding.optimizer_state_shardings(abstract["opt_state"], dict(out), at_rest, mesh)
  out["step"] = out["rng"] = sharding.replicated(mesh)
  return out
