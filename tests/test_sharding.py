"""Mesh from config, the rules table, the replication check and batch placement on 8 fake CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from o1jax import sharding
from o1jax.model import ModelConfig, init_params, logical_axes


def test_mesh_sizes_from_config():
  assert dict(sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2}).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}).devices.size == 1
  with pytest.raises(ValueError, match="more than one axis is -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.mesh_shape({"data": 4, "fsdp": 4, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="tensor=0"):
    sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 0}, 8)


def test_rules_map_logical_axes_and_fall_back_on_indivisible_dims():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.mesh_spec(("layers", "embed", "mlp"), (2, 32, 64), mesh) == PartitionSpec(None, "fsdp", "tensor")
  assert sharding.mesh_spec(("activation_batch", "activation_length"), (8, 5), mesh) == PartitionSpec(
      ("data", "fsdp"))
  assert sharding.mesh_spec(("layers", "embed", "mlp"), (2, 32, 63), mesh) == PartitionSpec(None, "fsdp")
  flat = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  assert sharding.mesh_spec(("vocab", "embed"), (64, 32), flat) == PartitionSpec(None, "fsdp")
  with pytest.raises(KeyError, match="no rule"):
    sharding.mesh_spec(("nonsense",), (4,), mesh)


def _model_shardings(cfg, mesh):
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return abstract, sharding.logical_to_shardings(logical_axes(cfg), abstract, mesh)


def test_replication_check_catches_unshardable_models():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  good = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  assert sharding.check_replication(*_model_shardings(good, mesh), mesh) < sharding.MAX_REPLICATED_FRACTION
  # hidden 36 is not divisible by fsdp=8: every matrix falls back to replication.
  bad = good.replace(hidden_size=36)
  with pytest.raises(ValueError, match="replicated on mesh"):
    sharding.check_replication(*_model_shardings(bad, mesh), mesh)
  # Pure data parallelism replicates on purpose.
  dp = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  assert sharding.check_replication(*_model_shardings(bad, dp), dp) == 0.0


def test_shard_batch_and_place():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  host = {"ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3), "scores": np.ones((8, 2), np.float32)}
  placed = sharding.shard_batch(host, mesh)
  for name, x in placed.items():
    np.testing.assert_array_equal(np.asarray(x), host[name])
    assert x.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert {s.data.shape[0] for s in x.addressable_shards} == {2}
  with pytest.raises(ValueError, match="'ids': 6 global rows"):
    sharding.shard_batch({"ids": host["ids"][:6]}, mesh)
  tree = {"w": np.arange(32.0, dtype=np.float32).reshape(4, 8)}
  shardings = {"w": jax.sharding.NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))}
  out = sharding.place(tree, shardings)
  np.testing.assert_array_equal(np.asarray(out["w"]), tree["w"])
  assert out["w"].sharding == shardings["w"]


def test_single_process_does_not_initialize_distributed(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed() is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert sharding.initialize_distributed() is False


def test_multi_slice_mesh_sizes():
  """config.mesh sizes are per slice; the data axis spans dcn_data slices (the hybrid mesh itself: test_aot)."""
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2}, 8) == (2, 4, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2, "dcn_data": 2}, 16) == (4, 2, 2)
  with pytest.raises(ValueError, match="dcn_data=3: must be >= 1 and divide the 8 devices"):
    sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 3}, 8)
  with pytest.raises(ValueError, match="needs 2 devices per slice; each of the 2 slices has 4"):
    sharding.mesh_shape({"data": 1, "fsdp": 2, "tensor": 1, "dcn_data": 2}, 8)
  # One process of CPU devices is one slice: two cannot be made of it.
  with pytest.raises(ValueError, match="no slice_index and come from 1 processes"):
    sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2})


def _lora_trainer(mesh):
  from tests.test_train_step import SPECIAL, TINY, make_settings  # pylint: disable=import-outside-toplevel
  from o1jax.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  return Trainer(TINY, make_settings(finetune="lora", train_special_tokens=False), mesh, SPECIAL)


def _lora_specs(trainer) -> dict:
  return {jax.tree_util.keystr(p): s.spec for p, s in
          jax.tree_util.tree_flatten_with_path(trainer.state_shardings["lora"])[0]}


def test_lora_adapters_are_sharded_and_train_like_replicated_ones(monkeypatch):
  """On 8 devices (fsdp 8) every adapter's model-facing side is split; a replicated layout (the old rule) is caught
  by the replication guard and, with the guard off, trains to the same losses and adapters."""
  from tests.test_train_step import make_batch  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  sharded = _lora_trainer(mesh)
  specs = _lora_specs(sharded)
  assert len(specs) == 8  # q, v, o, down: A and B
  for name, spec in specs.items():
    want = PartitionSpec(None, "fsdp") if name.endswith("['lora_a']") else PartitionSpec(None, None, "fsdp")
    assert spec == want, (name, spec)
  moments = [s.spec for p, s in jax.tree_util.tree_flatten_with_path(sharded.state_shardings["opt_state"])[0]
             if "lora" in jax.tree_util.keystr(p) and "q_proj" in jax.tree_util.keystr(p)]
  assert moments and all("fsdp" in spec for spec in moments)  # Adam's moments follow their adapters
  # fsdp x tensor: split over both when the dimension allows it.
  both = _lora_specs(_lora_trainer(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})))
  assert both["['layers']['self_attn']['q_proj']['lora_a']"] == PartitionSpec(None, ("fsdp", "tensor"))

  monkeypatch.setattr(sharding, "LOGICAL_RULES", tuple(r for r in sharding.LOGICAL_RULES if r[0] != "lora_fan")
                      + (("lora_fan", None),))
  with pytest.raises(ValueError, match="100.0% of 2,176 LoRA adapter elements are replicated on mesh"):
    _lora_trainer(mesh)
  monkeypatch.setattr(sharding, "check_replication", lambda *args, **kwargs: 0.0)
  replicated = _lora_trainer(mesh)
  assert all(s == PartitionSpec() for s in _lora_specs(replicated).values())

  params = jax.device_get(sharded.init_state(jax.random.key(0))["params"])
  states = [t.init_state(jax.random.key(0), params) for t in (sharded, replicated)]
  for step in range(3):
    batch = make_batch(seed=step)
    results = [t.step(s, t.shard_batch(batch)) for t, s in zip((sharded, replicated), states)]
    states = [state for state, _ in results]
    a, b = (jax.device_get(metrics) for _, metrics in results)
    for key in ("loss", "loss_ctr", "loss_gen", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"step {step + 1} {key}")
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(states[0]["lora"]))[0],
                          jax.tree.leaves(jax.device_get(states[1]["lora"]))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
