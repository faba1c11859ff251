"""Attention implementations, named remat policies and unrolled layers.

Every implementation that runs on this CPU equals the einsum reference on left- and right-padded rows, grouped
query attention and Mistral's sliding window, through prefill and KV-cache decoding; splash (Pallas' TPU kernel,
through its interpreter here) equals it in values and gradients, and inside the model on a mesh that shards batch
and kv heads; cuDNN, which needs a GPU, and splash where it cannot run (lengths, KV cache) fall back with one log
line. Every remat policy gives the gradients of no remat, and the named ones keep what
their names say (compiled temporary memory between `full` and `none`). Unrolled layers compute what the layer
loop computes.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax import sharding
from o1jax.generate import Generator
from o1jax.model import REMAT_POLICIES, Decoder, ModelConfig, init_params, pooling
from o1jax.model.attention import attend
from o1jax.model.decoder import attention_mask

CFG = ModelConfig(family="mistral", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5)


def padded_rows(seed, rows=4, length=12):
  """Random ids with a mask: even rows right-padded, odd rows left-padded, each at least 3 real tokens."""
  rs = np.random.RandomState(seed)
  ids = rs.randint(3, CFG.vocab_size, (rows, length)).astype(np.int32)
  mask = np.zeros((rows, length), np.int32)
  for i in range(rows):
    real = rs.randint(3, length + 1)
    if i % 2:
      mask[i, length - real:] = 1
    else:
      mask[i, :real] = 1
  return ids, mask


def grouped_qkv(seed, t, heads, hd, window, kv_heads=2, b=3):
  """Random q, k, v of grouped-query attention over `b` rows of `t` tokens (row 0 right-padded from 70%, row 1
  left-padded to 12%), which keys are real, and the causal mask (within `window`) over them."""
  rs = np.random.RandomState(seed)
  q = jnp.asarray(rs.randn(b, t, heads, hd), jnp.float32)
  k, v = (jnp.asarray(rs.randn(b, t, kv_heads, hd), jnp.float32) for _ in range(2))
  valid = np.ones((b, t), bool)
  valid[0, int(0.7 * t):] = False
  valid[1, :int(0.12 * t) + 1] = False
  return q, k, v, valid, attention_mask(jnp.arange(t), jnp.arange(t), jnp.asarray(valid), window)


@pytest.mark.parametrize("window", [None, 3])
def test_xla_attention_equals_einsum_on_every_real_query(window):
  q, k, v, valid, mask = grouped_qkv(0, t=10, heads=6, hd=8, window=window)
  reference = np.asarray(attend(q, k, v, mask, "einsum"))
  got = np.asarray(attend(q, k, v, mask, "xla"))
  np.testing.assert_allclose(got[valid], reference[valid], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 100])
def test_splash_attention_equals_einsum_in_values_and_gradients(window):
  q, k, v, valid, mask = grouped_qkv(1, t=256, heads=4, hd=16, window=window)

  def loss(implementation):
    def f(q, k, v):
      out = attend(q, k, v, mask, implementation, jnp.asarray(valid), window)
      return jnp.sum((out * valid[:, :, None]) ** 2), out
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

  (_, want), want_grads = loss("einsum")(q, k, v)
  (_, got), got_grads = loss("splash")(q, k, v)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-5, atol=2e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_splash_in_the_model_on_a_mesh_equals_the_einsum_model():
  """Batch rows and kv heads sharded over 8 CPU devices: the kernel runs per device inside shard_map."""
  cfg = CFG.replace(sliding_window=100)
  params = init_params(cfg, jax.random.key(3))
  ids, mask = padded_rows(4, rows=8, length=128)
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def hidden(attention):
    with sharding.activation_rules(mesh):
      apply = jax.jit(lambda p, i, m: Decoder(cfg.replace(attention=attention)).apply(
          {"params": p}, i, pooling.positions(m), m))
      return np.asarray(apply(params, ids, mask))

  np.testing.assert_allclose(hidden("splash")[mask == 1], hidden("einsum")[mask == 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "cudnn", "splash", "auto"])
def test_model_outputs_equal_the_einsum_model(implementation, caplog):
  params = init_params(CFG, jax.random.key(0))
  ids, mask = padded_rows(1)
  positions = pooling.positions(jnp.asarray(mask))

  def hidden(cfg):
    return np.asarray(Decoder(cfg).apply({"params": params}, ids, positions, mask))

  with caplog.at_level(logging.INFO):
    got = hidden(CFG.replace(attention=implementation))
  np.testing.assert_allclose(got[mask == 1], hidden(CFG.replace(attention="einsum"))[mask == 1], rtol=1e-5,
                             atol=1e-5)
  if implementation == "cudnn":  # no GPU here: one line says so
    assert "attention=cudnn: no GPU" in caplog.text
  if implementation == "splash":  # 12 tokens: not a length the kernel's blocks tile
    assert "attention=splash: lengths 12 x 12 are not one multiple of 128; using the einsum" in caplog.text


def test_prefill_and_decoding_equal_the_einsum_model(caplog):
  params = init_params(CFG, jax.random.key(1))
  prompts = [[5, 9, 14, 3, 77, 41, 8], [12, 40], [7, 7, 7, 50, 61]]  # left-padded inside the generator
  with caplog.at_level(logging.INFO):
    outputs = [Generator(CFG.replace(attention=a), params, eos_ids=[2], pad_id=0).generate(prompts, max_new_tokens=9)
               for a in ("einsum", "xla", "splash")]
  assert outputs[0] == outputs[1] == outputs[2]
  assert "attention=splash: splash takes attention without a KV cache" in caplog.text


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="attention='flash'; expected one of auto, einsum, xla, cudnn, splash"):
    CFG.replace(attention="flash")


def _loss(cfg, ids, mask):
  def loss(params):
    hidden = Decoder(cfg).apply({"params": params}, ids, pooling.positions(mask), mask)
    return jnp.sum(pooling.pool_last(hidden, mask) ** 3) + jnp.mean(hidden**2)
  return loss


def test_every_remat_policy_gives_the_gradients_of_no_remat():
  params = init_params(CFG, jax.random.key(2))
  ids, mask = padded_rows(3)
  reference = jax.grad(_loss(CFG, ids, mask))(params)
  for policy in REMAT_POLICIES:
    grads = jax.jit(jax.grad(_loss(CFG.replace(remat_policy=policy), ids, mask)))(params)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=policy)


def test_named_policies_keep_less_than_none_and_more_than_full():
  cfg = CFG.replace(num_hidden_layers=4, hidden_size=64, intermediate_size=256, head_dim=16)
  params = init_params(cfg, jax.random.key(4))
  ids, mask = (np.tile(x, (8, 8)) for x in padded_rows(5))  # [32, 96]: activations dominate the memory

  def temp_bytes(policy):
    step = jax.jit(jax.grad(_loss(cfg.replace(remat_policy=policy), ids, mask)))
    return step.lower(params).compile().memory_analysis().temp_size_in_bytes

  sizes = {policy: temp_bytes(policy) for policy in ("none", "minimal", "save_qkv_proj", "full")}
  assert sizes["full"] < sizes["save_qkv_proj"] < sizes["minimal"] < sizes["none"], sizes


@pytest.mark.parametrize("policy", ["none", "full"])
def test_unrolled_layers_give_the_hidden_states_and_gradients_of_the_loop(policy):
  cfg = CFG.replace(num_hidden_layers=3, remat_policy=policy)
  params = init_params(cfg, jax.random.key(6))
  ids, mask = padded_rows(7)
  unrolled = cfg.replace(unroll_layers=True)
  hidden = [np.asarray(Decoder(c).apply({"params": params}, ids, pooling.positions(mask), mask))
            for c in (cfg, unrolled)]
  np.testing.assert_allclose(hidden[1][mask == 1], hidden[0][mask == 1], rtol=1e-5, atol=1e-6)
  grads = [jax.jit(jax.grad(_loss(c, ids, mask)))(params) for c in (cfg, unrolled)]
  for got, want in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The parameter tree is the same stacked one, so checkpoints and exports do not depend on the setting.
  assert jax.tree.structure(init_params(unrolled, jax.random.key(6))) == jax.tree.structure(params)


def test_a_generator_given_unrolled_layers_decodes_as_the_loop_does():
  params = init_params(CFG, jax.random.key(8))
  prompts = [[5, 9, 14, 3], [12, 40, 41]]
  outputs = [Generator(c, params, eos_ids=[2], pad_id=0).generate(prompts, max_new_tokens=6)
             for c in (CFG, CFG.replace(unroll_layers=True))]
  assert outputs[0] == outputs[1]
