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
