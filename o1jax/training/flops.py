"""FLOP accounting: the model FLOPs of one training step (the MFU numerator) and the hardware peak (denominator)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from o1jax.data.batch import BatchShape
from o1jax.model import ModelConfig

# Dense bf16 peak FLOP/s per chip by jax `device_kind` (vendor figures; H100's 1979 is with sparsity, not used).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v6 lite": 918e12,  # v6e
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


def measured_matmul_peak(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
  """FLOP/s of the best of `repeats` jitted [size, size] matmuls of `dtype` operands on the default device (the CPU
  "peak"), written in float32 as a training step's are (XLA:CPU's bfloat16 kernel writes float32)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops(dtype: str = "float32") -> float:
  """Peak FLOP/s of the whole run: table value x device count, or on CPU the measured matmul peak of the host
  for `dtype` operands (the compute dtype).

  Fake CPU devices (`--xla_force_host_platform_device_count`) share the host's cores, so the host figure is the
  whole machine's. 0.0 when the accelerator is not in the table (MFU is then not logged).
  """
  device = jax.devices()[0]
  if device.platform == "cpu":
    return measured_matmul_peak(dtype=dtype)
  return PEAK_FLOPS.get(device.device_kind, 0.0) * jax.device_count()


def step_flops(cfg: ModelConfig, batch: BatchShape, *, body_trained: bool, lora_params: int, lm_loss: bool,
               head_trained: bool) -> float:
  """Model FLOPs of one step on a global batch. Convention:

  * a matmul of a token's [k] activation with a [k, m] weight costs 2km forward, 2km for the input gradient
    and, only when the weight is trained, 2km for the weight gradient: 6 * params * tokens for full
    fine-tuning, 4 * params * tokens for frozen weights (LoRA base), adapters counted as trained matmuls;
  * attention QK^T and PV: 4 * T^2 * heads * head_dim per sequence and layer forward, x3 with backward, over
    the FULL T x T square (causality NOT halved: the kernel computes the square and masks);
  * the LM head on query tokens only (documents skip it; skipped entirely without an LM loss); embedding
    lookups free; padding tokens counted (they are computed);
  * remat recomputation and GradCache's extra no-grad embedding pass EXCLUDED (model FLOPs, not hardware).
  """
  nq, lq = batch.queries, batch.query_length
  nd, ld = batch.queries * batch.group_size, batch.doc_length
  tokens = batch.tokens()
  d, hd = cfg.hidden_size, cfg.head_dim
  layer_params = (d * cfg.num_attention_heads * hd * 2 + d * cfg.num_key_value_heads * hd * 2
                  + 3 * d * cfg.intermediate_size)
  flops = (6 if body_trained else 4) * cfg.num_hidden_layers * layer_params * tokens
  flops += 6 * lora_params * tokens
  attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * hd
  flops += attention * (nq * lq * lq + nd * ld * ld)
  if lm_loss:
    flops += (6 if head_trained else 4) * d * cfg.vocab_size * nq * lq
  return float(flops)
