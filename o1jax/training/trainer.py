"""The jitted, sharded training step and its public entry points (run, lower, gradients, inference parameters).

The parts live in their own modules: which leaves train (`trainable`), the state and its shardings (`state`),
the objective (`objective`), FLOP accounting (`flops`). This class wires them to one mesh and one jit.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from o1jax import checkpoint, lora, optim, sharding
from o1jax.data.batch import BatchShape
from o1jax.model import ModelConfig
from o1jax.tokenizer import SpecialIds
from o1jax.training import flops, objective as objective_lib, sources, state as state_lib, trainable as trainable_lib


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
  """Everything the step depends on besides the model and the mesh (built from `config.train` and
  `config.optim` by `o1jax.config.trainer_settings`)."""
  steps: int
  objective: objective_lib.Objective = objective_lib.Objective()
  selection: trainable_lib.Selection = trainable_lib.Selection()
  optim: optim.OptimConfig = optim.OptimConfig()


class Trainer:
  """The optimizer, trainable-parameter selection, state shardings and the jitted step of one training run."""

  def __init__(self, model_cfg: ModelConfig, settings: TrainerSettings, mesh: Mesh, special_ids: SpecialIds):
    self.model_cfg, self.settings, self.mesh, self.special_ids = model_cfg, settings, mesh, special_ids
    self.objective = settings.objective
    self.lora_cfg = settings.selection.lora
    self.forward = objective_lib.Forward(model_cfg, self.lora_cfg)

    params = state_lib.abstract_params(model_cfg)
    self.grad_use = trainable_lib.grad_use(settings.selection, params)
    labels = jax.tree.map(lambda u: optim.FROZEN if u == trainable_lib.FROZEN else optim.TRAIN, self.grad_use)
    self.optimizer = optim.make_optimizer(settings.optim, settings.steps, labels)
    self.schedule = optim.schedule(settings.optim, settings.steps)
    self._init = state_lib.initializer(model_cfg, self.lora_cfg, self.optimizer)
    self.abstract_state = state_lib.abstract_state(self._init, params)
    self.state_shardings = state_lib.shardings(self.abstract_state, model_cfg, self.lora_cfg, mesh)
    at_rest = trainable_lib.trainable_part(self.abstract_state)
    sharding.check_replication(at_rest, trainable_lib.trainable_part(self.state_shardings), mesh)

    rows = sharding.batch_sharding(mesh)
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, rows),
                         out_shardings=(self.state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    self._grads = jax.jit(self._loss_and_grads, in_shardings=(self.state_shardings, rows))

  def _loss_and_grads(self, state: Mapping[str, Any], batch: Mapping[str, jnp.ndarray]) -> tuple[Any, dict]:
    return objective_lib.loss_and_grads(self.objective, self.forward, self.mesh, self.grad_use, self.special_ids,
                                        self.schedule, state, batch)

  def _train_step(self, state: dict, batch: Mapping[str, jnp.ndarray]) -> tuple[dict, dict]:
    grads, metrics = self._loss_and_grads(state, batch)
    trainable = trainable_lib.trainable_part(state)
    # The optimizer sees the full tree; zeros at frozen leaves are dead code (never read), so XLA drops them.
    full_grads = jax.tree.map(lambda g, x: jnp.zeros_like(x) if g is None else g, grads, trainable,
                              is_leaf=lambda x: x is None)
    updates, opt_state = self.optimizer.update(full_grads, state["opt_state"], trainable)
    new = jax.tree.map(lambda use, x, u: x if use == trainable_lib.FROZEN else optax.apply_updates(x, u),
                       self.grad_use, trainable, updates)
    return {**state, **new, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  # ---------------------------------------------------------------- public entry points

  def init_state(self, rng: jax.Array, params: Any | None = None) -> dict:
    """The sharded training state, built directly on the mesh (the full model never sits on one device).

    Args:
      rng: a PRNG key (typed or raw key data).
      params: None for random parameters; else parameters in the model's layout, either already on this mesh
        (`sources.build_model(..., mesh)`: used as they are, or resharded on the devices when their shardings
        differ, with no host copy), or host arrays, placed onto the mesh shard by shard.
    """
    rng_data = rng if rng.dtype == jnp.uint32 else jax.random.key_data(rng)
    with sharding.activation_rules(self.mesh):
      rep = sharding.replicated(self.mesh)
      if params is None:
        init = jax.jit(lambda r: self._init(r, None), in_shardings=(rep,), out_shardings=self.state_shardings)
        return init(rng_data)
      placed = self._on_mesh(params)
      init = jax.jit(self._init, in_shardings=(rep, self.state_shardings["params"]),
                     out_shardings=self.state_shardings)
      return init(rng_data, placed)

  def _on_mesh(self, params: Any) -> Any:
    """Arrays already on this mesh's devices are resharded there (nothing moves when the shardings match); host
    arrays, or the one-device arrays of `load_hf`/`load_gguf`, are placed shard by shard."""
    targets = self.state_shardings["params"]
    mesh_devices = set(self.mesh.devices.flat)
    if all(isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices for x in jax.tree.leaves(params)):
      return jax.device_put(params, targets)
    return sharding.place(params, targets)

  def abstract_state_with_shardings(self) -> dict:
    """The state as ShapeDtypeStructs carrying their shardings: a checkpoint's restore target, AOT's input."""
    return checkpoint.abstract_like(self.abstract_state, self.state_shardings)

  def step(self, state: dict, batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
    """One optimizer step on a global batch from `shard_batch`; `state` is donated (do not reuse it)."""
    with sharding.activation_rules(self.mesh):
      return self._step(state, batch)

  def lower_step(self, state: Any, batch: Mapping[str, Any]) -> jax.stages.Lowered:
    """The step lowered for abstract (ShapeDtypeStruct) or concrete inputs: `.compile()` it for AOT memory and
    cost analysis without running anything."""
    with sharding.activation_rules(self.mesh):
      return self._step.lower(state, batch)

  def grads(self, state: dict, batch: Mapping[str, jax.Array]) -> tuple[Any, dict]:
    """(masked gradients of the trainable leaves, None where frozen; metrics) without updating: for checks."""
    with sharding.activation_rules(self.mesh):
      return self._grads(state, batch)

  def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows (numpy) → global arrays sharded over the batch axes."""
    return sharding.shard_batch(host_batch, self.mesh)

  def inference_params(self, state: Mapping[str, Any]) -> Any:
    """The model parameters a retriever runs with: LoRA adapters merged into the kernels."""
    if self.lora_cfg is None:
      return state["params"]
    return lora.merge(state["params"], state["lora"], self.lora_cfg)

  def flops_per_step(self, batch: BatchShape) -> float:
    """Model FLOPs of one step on a global batch of this shape (convention: `flops.step_flops`)."""
    lora_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.get("lora", {})))
    return flops.step_flops(self.model_cfg, batch, body_trained=self.lora_cfg is None, lora_params=lora_params,
                            lm_loss=bool(self.objective.w_gen), head_trained=trainable_lib.head_trained(self.grad_use))


def shape_only_trainer(model: sources.ModelSource, data: sources.DataSource, settings: TrainerSettings,
                       mesh: Mesh) -> Trainer:
  """The trainer a real run would build, from shapes alone (no weights read): for AOT compilation, benchmarks."""
  model_cfg, special = sources.shape_only_model(model, data)
  return Trainer(model_cfg, settings, mesh, special)
