"""LoRA adapters through the model's own forward pass: zero-B identity, exact merge, dropout, logical axes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax import lora
from o1jax.model import Decoder, ModelConfig, init_params, logical_axes

CFG = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True,
                  remat_policy="full")
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.25, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"))


@pytest.fixture(scope="module")
def setup():
  params = init_params(CFG, jax.random.key(0))
  adapters = lora.init(params, LORA, jax.random.key(1))
  ids = jax.random.randint(jax.random.key(2), (2, 9), 0, 64)
  mask = jnp.ones_like(ids).at[1, 6:].set(0)
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  return params, adapters, (ids, positions, mask)


def _forward(params, inputs):
  return Decoder(CFG).apply({"params": params}, *inputs)


def _with_b(adapters, value):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, value) if p[-1].key == lora.B else x, adapters)


def test_zero_b_is_the_base_model(setup):
  params, adapters, inputs = setup
  with lora.applied(LORA.scale, LORA.dropout):
    out = _forward(lora.with_adapters(params, adapters), inputs)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_forward(params, inputs)))


def test_adapters_change_outputs_and_merge_exactly(setup):
  params, adapters, inputs = setup
  adapters = _with_b(adapters, 0.05)
  base = _forward(params, inputs)
  with lora.applied(LORA.scale, LORA.dropout):
    out = _forward(lora.with_adapters(params, adapters), inputs)  # no dropout keys: evaluation
  assert np.abs(np.asarray(out - base)).max() > 1e-2
  merged = lora.merge(params, adapters, LORA)
  np.testing.assert_allclose(np.asarray(_forward(merged, inputs)), np.asarray(out), atol=2e-5)
  untouched = merged["layers"]["self_attn"]["v_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(untouched), np.asarray(params["layers"]["self_attn"]["v_proj"]["kernel"]))


def test_dropout_on_the_lora_input_only_with_keys(setup):
  params, adapters, inputs = setup
  adapters = _with_b(adapters, 0.05)
  with lora.applied(LORA.scale, LORA.dropout):
    a = _forward(lora.with_adapters(params, adapters, jax.random.key(5)), inputs)
    b = _forward(lora.with_adapters(params, adapters, jax.random.key(5)), inputs)
    c = _forward(lora.with_adapters(params, adapters, jax.random.key(6)), inputs)
    clean = _forward(lora.with_adapters(params, adapters), inputs)
    zero_b = _forward(lora.with_adapters(params, _with_b(adapters, 0.0), jax.random.key(5)), inputs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert not np.allclose(np.asarray(a), np.asarray(clean))
  # Dropout acts on the adapter path only: with B = 0 the base output is untouched.
  np.testing.assert_array_equal(np.asarray(zero_b), np.asarray(_forward(params, inputs)))


def test_shapes_init_and_axes(setup):
  params, adapters, _ = setup
  q = adapters["layers"]["self_attn"]["q_proj"]
  assert q[lora.A].shape == (2, 32, 4) and q[lora.B].shape == (2, 4, 32)
  assert np.abs(np.asarray(q[lora.A])).max() <= 32**-0.5 and np.asarray(q[lora.A]).std() > 0
  assert set(adapters["layers"]["mlp"]) == {"gate_proj", "down_proj"}
  axes = lora.logical_axes(logical_axes(CFG), LORA)
  assert tuple(axes["layers"]["mlp"]["down_proj"][lora.A]) == ("layers", "lora_fan", "lora_rank")
  assert tuple(axes["layers"]["mlp"]["down_proj"][lora.B]) == ("layers", "lora_rank", "lora_fan")
  with pytest.raises(ValueError, match="unknown \\['qkv'\\]"):
    lora.check_targets(["qkv"])
