"""The decoder's projections (`Projection`, an `nn.Dense`): bfloat16 rows on a CPU through XLA:CPU's fast kernel.

XLA:CPU multiplies bfloat16 matrices at 1.6-1.7x its float32 rate (its YNNPACK kernel; the measured peaks are in
launch/results/bench/train*.json) only when the product is written in float32 and the left operand contracts over
its last, contiguous axis. A plain bfloat16 `dot_general` writes bfloat16, and the weight gradient contracts
over the tokens (the first axis of both operands), so XLA converts to float32 and runs the float32 kernel for all
three matmuls of a projection. Here the forward and the input gradient are written in float32 and rounded, the
weight gradient reads the activations transposed in memory and reaches the float32 weights without rounding.
With bfloat16 weights (inference) the product is written in float32 and rounded. Same products and float32 sums as
XLA's own. Elsewhere (GPUs, TPUs, other dtypes) it is `nn.Dense`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from o1jax.model.attention import traced_platform

_ROWS_BY_KERNEL = (((1,), (0,)), ((), ()))  # [tokens, in] x [in, out]
_ROWS_BY_KERNEL_T = (((1,), (1,)), ((), ()))  # [tokens, out] x [in, out]^T


def _float32_product(lhs, rhs, dimension_numbers):
  return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _cpu_bf16_matmul(rows, kernel):
  return _float32_product(rows, kernel.astype(rows.dtype), _ROWS_BY_KERNEL).astype(rows.dtype)


def _forward(rows, kernel):
  return _cpu_bf16_matmul(rows, kernel), (rows, kernel.astype(rows.dtype))


def _backward(saved, grad):
  rows, kernel = saved
  grad = grad.astype(rows.dtype)
  grad_rows = _float32_product(grad, kernel, _ROWS_BY_KERNEL_T).astype(rows.dtype)
  # rows^T laid out [in, tokens] in memory: transposing through a unit axis keeps XLA from folding the transpose
  # into the matmul's dimension numbers (which would send it back to the float32 kernel).
  rows_t = jnp.transpose(rows[:, :, None], (2, 1, 0)).reshape(rows.shape[1], rows.shape[0])
  # The kernel's gradient leaves in float32, as accumulated: the float32 master weights get it unrounded.
  return grad_rows, _float32_product(rows_t, grad, _ROWS_BY_KERNEL)


_cpu_bf16_matmul.defvjp(_forward, _backward)


class Projection(nn.Dense):
  """`nn.Dense` (the same parameters; LoRA's interceptor treats it as one) that, traced for a CPU with bfloat16
  compute, multiplies rows [tokens, in] through `_cpu_bf16_matmul` (float32 weights) or writes the product in
  float32 (bfloat16 weights, as `o1jax.eval --dtype=bfloat16` loads them)."""

  # Both paths in one body: deferring to `super().__call__` would run method interceptors (LoRA's) twice.
  @nn.compact
  def __call__(self, rows):
    kernel = self.param("kernel", self.kernel_init, (rows.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    if (rows.ndim == 2 and jnp.dtype(self.dtype) == jnp.bfloat16 and kernel.dtype in (jnp.float32, jnp.bfloat16)
        and traced_platform() == "cpu"):
      rows = rows.astype(jnp.bfloat16)
      if kernel.dtype == jnp.float32:
        out = _cpu_bf16_matmul(rows, kernel)
      else:  # bfloat16 weights (inference): XLA:CPU multiplies bfloat16 on its fast kernel only into float32
        out = _float32_product(rows, kernel, _ROWS_BY_KERNEL).astype(jnp.bfloat16)
      return out if bias is None else out + bias.astype(out.dtype)
    rows, kernel, bias = self.promote_dtype(rows, kernel, bias, dtype=self.dtype)
    out = lax.dot_general(rows, kernel, (((rows.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return out if bias is None else out + bias
