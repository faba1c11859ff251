"""The CPU bfloat16 projection (`o1jax.model.projection`): the same products as float32 math, and every one of its
three matmuls on XLA:CPU's bfloat16 kernel."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax import lora
from o1jax.model import init_params, projection
from o1jax.model.config import ModelConfig
from o1jax.model.decoder import Decoder

def _float32_reference(rows, kernel):
  """What XLA computes for a plain bfloat16 dot on a CPU: float32 math on the bfloat16 values, rounded."""
  return (rows.astype(jnp.float32) @ kernel.astype(jnp.float32)).astype(jnp.bfloat16)


def _ulps(a, b):
  """Distance in bfloat16 steps (1 = neighbouring values): summation order may round the other way."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.abs(a - b) / np.maximum(np.spacing(np.abs(b).astype(np.float32)) * 2**16, 1e-30)


def _projection(rng, dtype, rows_shape=(96, 64), features=80):
  layer = projection.Projection(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32)
  rows = jnp.asarray(rng.standard_normal(rows_shape, np.float32), dtype)
  return layer, layer.init(jax.random.key(0), rows)["params"]["kernel"], rows


def test_the_product_and_both_gradients_are_float32_math_on_the_bfloat16_values():
  rng = np.random.default_rng(0)
  layer, kernel, rows = _projection(rng, jnp.bfloat16)
  weights = jnp.asarray(rng.standard_normal((96, 80), np.float32))
  ours = lambda r, k: layer.apply({"params": {"kernel": k}}, r)
  loss = lambda dot: lambda r, k: jnp.sum(dot(r, k).astype(jnp.float32) * weights)
  out = jax.jit(ours)(rows, kernel)
  assert out.dtype == jnp.bfloat16
  expected = lambda r, k: _float32_reference(r, k.astype(jnp.bfloat16))
  assert _ulps(out, expected(rows, kernel)).max() <= 1
  (grad_rows, grad_kernel), (want_rows, want_kernel) = (
      jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(rows, kernel) for fn in (ours, expected))
  assert grad_rows.dtype == jnp.bfloat16 and _ulps(grad_rows, want_rows).max() <= 1
  # The float32 weights' gradient is the float32 sum itself, not rounded to bfloat16 on the way.
  assert grad_kernel.dtype == jnp.float32
  exact = rows.astype(jnp.float32).T @ (weights.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(grad_kernel, exact, rtol=1e-5, atol=1e-4)
  assert float(jnp.max(jnp.abs(grad_kernel - want_kernel))) > 0  # XLA's own rounds it through bfloat16


def test_float32_compute_is_nn_dense():
  rng = np.random.default_rng(1)
  layer, kernel, rows = _projection(rng, jnp.float32, rows_shape=(4, 8, 64))
  np.testing.assert_array_equal(layer.apply({"params": {"kernel": kernel}}, rows),
                                nn.Dense(80, use_bias=False).apply({"params": {"kernel": kernel}}, rows))


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
  """The element types each dot of a compiled program reads, found in the computation that holds it."""
  types = []
  for block in re.split(r"\n(?=\S)", hlo):
    defined = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", block))
    for lhs, rhs in re.findall(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)", block):
      types.append((defined[lhs], defined[rhs]))
  return types


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernels")
def test_all_three_matmuls_of_a_projection_read_bfloat16_on_the_cpu():
  """The speed comes from XLA:CPU's bfloat16 kernel; a plain bfloat16 dot would have it convert every operand to
  float32 first (this test fails if a jax upgrade sends any of the three back there)."""
  layer, kernel, rows = _projection(np.random.default_rng(2), jnp.bfloat16, rows_shape=(256, 64), features=128)
  for dense, reads in ((layer, [("bf16", "bf16")] * 3), (nn.Dense(128, use_bias=False, dtype=jnp.bfloat16), None)):
    loss = lambda r, k: jnp.sum(dense.apply({"params": {"kernel": k}}, r).astype(jnp.float32) ** 2)
    types = _dot_operand_types(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(rows, kernel).compile().as_text())
    if reads:
      assert types == reads
    else:
      assert ("f32", "f32") in types  # what a plain bfloat16 nn.Dense does


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernels")
def test_bfloat16_weights_multiply_on_the_bfloat16_kernel_too():
  """Inference in bfloat16 (`o1jax.eval --dtype=bfloat16` loads bfloat16 weights): the product reads bfloat16, is
  float32 math on those values, and a gradient still flows (XLA's own, in the weights' dtype)."""
  rng = np.random.default_rng(6)
  layer, kernel, rows = _projection(rng, jnp.bfloat16, rows_shape=(256, 64), features=128)
  kernel = kernel.astype(jnp.bfloat16)
  apply = lambda r, k: layer.apply({"params": {"kernel": k}}, r)
  out = jax.jit(apply)(rows, kernel)
  assert out.dtype == jnp.bfloat16 and _ulps(out, _float32_reference(rows, kernel)).max() <= 1
  assert _dot_operand_types(jax.jit(apply).lower(rows, kernel).compile().as_text()) == [("bf16", "bf16")]
  grad = jax.grad(lambda k: jnp.sum(apply(rows, k).astype(jnp.float32)))(kernel)
  assert grad.dtype == jnp.bfloat16 and float(jnp.max(jnp.abs(grad.astype(jnp.float32)))) > 0


def test_a_bfloat16_decoder_trains_like_its_float32_twin():
  """The whole model through the CPU projection: bfloat16 compute's loss and gradients stay within bfloat16's
  precision of the float32 model's (same weights)."""
  cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype="float32")
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 128, (4, 24)), jnp.int32)
  positions, mask = jnp.broadcast_to(jnp.arange(24), (4, 24)), jnp.ones((4, 24), jnp.int32)
  params = Decoder(cfg).init(jax.random.key(0), ids, positions, mask, method=Decoder.forward_logits)["params"]

  def loss(dtype):
    model = Decoder(cfg.replace(dtype=dtype))

    def fn(p):
      logits = model.apply({"params": p}, ids, positions, mask, method=Decoder.forward_logits)[1]
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])
    return jax.jit(jax.value_and_grad(fn))(params)

  (value32, grads32), (value16, grads16) = loss("float32"), loss("bfloat16")
  assert abs(float(value16) - float(value32)) < 0.02 * abs(float(value32)) + 1e-3
  for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
    assert g16.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(g32))) + 1e-6
    assert float(jnp.max(jnp.abs(g16 - g32))) < 0.05 * scale


def test_lora_adapters_on_the_bfloat16_path_are_added_once_and_train_like_float32():
  """LoRA's interceptor wraps the projection on the CPU bfloat16 path too: its term is added once (a second call
  would double the adapters' effect) and the adapters' gradients stay within bfloat16's precision of float32's."""
  cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, dtype="float32")
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (3, 16)), jnp.int32)
  positions, mask = jnp.broadcast_to(jnp.arange(16), (3, 16)), jnp.ones((3, 16), jnp.int32)
  params = init_params(cfg, jax.random.key(0))
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 0.05) if p[-1].key == lora.B else x,
      lora.init(params, lora_cfg, jax.random.key(1)))

  def hidden(dtype, adapted):
    model = Decoder(cfg.replace(dtype=dtype))

    def fn(a):
      with lora.applied(lora_cfg.scale, lora_cfg.dropout):
        tree = lora.with_adapters(params, a) if adapted else params
        return model.apply({"params": tree}, ids, positions, mask).astype(jnp.float32)
    return fn

  delta = {dtype: jax.jit(hidden(dtype, True))(adapters) - jax.jit(hidden(dtype, False))(adapters)
           for dtype in ("float32", "bfloat16")}
  scale = float(jnp.max(jnp.abs(delta["float32"])))
  assert scale > 1e-2 and float(jnp.max(jnp.abs(delta["bfloat16"] - delta["float32"]))) < 0.1 * scale

  weights = jnp.asarray(np.random.default_rng(5).standard_normal((3, 16, 32)), jnp.float32)
  grads = {dtype: jax.jit(jax.grad(lambda a: jnp.sum(hidden(dtype, True)(a) * weights)))(adapters)
           for dtype in ("float32", "bfloat16")}
  for g16, g32 in zip(jax.tree.leaves(grads["bfloat16"]), jax.tree.leaves(grads["float32"])):
    assert g16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(g16 - g32))) < 0.05 * (float(jnp.max(jnp.abs(g32))) + 1e-6)
