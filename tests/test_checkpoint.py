"""Orbax checkpoints: sharded round trip (also onto another mesh), keep-last-K / every-N, async, stop signals."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from o1jax import checkpoint


def mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def make_state(m):
  rng = np.random.default_rng(0)
  shard = lambda spec: NamedSharding(m, spec)
  state = {
      "params": {"w": jax.device_put(rng.normal(size=(16, 8)).astype(np.float32), shard(P("fsdp", "tensor"))),
                 "b": jax.device_put(rng.normal(size=(8,)).astype(jnp.bfloat16), shard(P()))},
      "opt_state": {"mu": jax.device_put(rng.normal(size=(16, 8)).astype(np.float32), shard(P("fsdp")))},
      "step": jax.device_put(np.int32(7), shard(P())),
      "rng": jax.device_put(jax.random.key_data(jax.random.key(3)), shard(P())),
  }
  return state


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x),
                                  np.asarray(y.astype(jnp.float32) if y.dtype == jnp.bfloat16 else y))


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_exact_and_reshards(tmp_path, async_save):
  m8 = mesh((1, 8, 1))
  state = make_state(m8)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=2, async_save=async_save)
  assert ckpt.latest_step() is None
  assert ckpt.save(7, state, {"next_batch": 7, "records": 256})
  ckpt.wait()
  assert ckpt.latest_step() == 7
  shardings = jax.tree.map(lambda x: x.sharding, state)
  restored, data = ckpt.restore(7, checkpoint.abstract_like(state, shardings))
  assert data == {"next_batch": 7, "records": 256}
  assert_same(restored, state)
  assert all(r.sharding == s for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)))
  # Restore onto another mesh layout (e.g. resuming on a different slice).
  m222 = mesh((2, 2, 2))
  other = jax.tree.map(lambda x: NamedSharding(m222, P(*[None] * x.ndim)), state)
  other["params"]["w"] = NamedSharding(m222, P(("data", "fsdp"), "tensor"))
  moved, _ = ckpt.restore(7, checkpoint.abstract_like(state, other))
  assert_same(moved, state)
  assert moved["params"]["w"].sharding == other["params"]["w"]
  ckpt.close()


def test_every_n_steps_keeps_last_k_and_force(tmp_path):
  state = make_state(mesh((8, 1, 1)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=3, keep=2)
  started = [step for step in range(1, 11) if ckpt.save(step, state, {"next_batch": step})]
  assert started == [3, 6, 9]
  assert ckpt.save(10, state, {"next_batch": 10}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [9, 10]
  assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == ["10", "9"]
  # A second manager on the same directory (a restarted run) sees the same checkpoints.
  again = checkpoint.Checkpointer(str(tmp_path), every=3, keep=2)
  assert again.latest_step() == 10
  assert again.restore(10, checkpoint.abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))[1] == {
      "next_batch": 10}
  ckpt.close()
  again.close()


def test_checksums_are_exact_on_any_mesh_and_see_a_changed_or_moved_value():
  state = make_state(mesh((1, 8, 1)))
  checksums, non_finite = checkpoint.fingerprint(state)
  assert not non_finite and set(checksums) == {"params.w", "params.b", "opt_state.mu", "step", "rng"}
  m222 = mesh((2, 2, 2))
  moved = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(m222, P(*[None] * x.ndim))), state)
  moved["params"]["w"] = jax.device_put(state["params"]["w"], NamedSharding(m222, P(("data", "fsdp"), "tensor")))
  assert checkpoint.fingerprint(moved)[0] == checksums  # integer sums: the reduction order does not matter
  w = np.asarray(state["params"]["w"])
  changed, swapped = w.copy(), w.copy()
  changed[3, 2] = np.nextafter(changed[3, 2], np.float32(np.inf))
  swapped[[0, 1]] = swapped[[1, 0]]
  for other in (changed, swapped):
    assert checkpoint.fingerprint({"params": {"w": jnp.asarray(other)}})[0]["params.w"] != checksums["params.w"]
  assert checkpoint.fingerprint({"b": jnp.array([1.0, np.inf], jnp.bfloat16)})[1] == ["b"]


def test_fallback_sets_a_corrupt_latest_step_aside_and_restores_the_one_before(tmp_path):
  state = make_state(mesh((8, 1, 1)))
  abstract = checkpoint.abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save(step, state, {"next_batch": step})
  (tmp_path / "2" / "state" / "_METADATA").unlink()  # a step copied in part
  with pytest.raises(checkpoint.CorruptStep, match=r"/2: checkpoint step 2 is corrupt or partial: its metadata "
                                                   r"cannot be read .*to resume from step 1, rerun with "
                                                   r"--config.checkpoint.fallback=True"):
    ckpt.restore_latest(abstract)
  step, restored, data = ckpt.restore_latest(abstract, fallback=True)
  assert (step, data) == (1, {"next_batch": 1})
  assert_same(restored, state)
  assert ckpt.all_steps() == [1] and (tmp_path / checkpoint.SET_ASIDE_DIR / "2" / "state").is_dir()
  ckpt.save(2, state, {"next_batch": 2})  # the step number is free again
  assert ckpt.all_steps() == [1, 2]
  (tmp_path / "1" / "state" / "_METADATA").unlink()
  (tmp_path / "2" / "state" / "_METADATA").unlink()
  with pytest.raises(checkpoint.CorruptStep, match="/1: .*no earlier step to fall back to"):
    ckpt.restore_latest(abstract, fallback=True)
  assert sorted(p.name for p in (tmp_path / checkpoint.SET_ASIDE_DIR).iterdir()) == ["2", "2.1"]
  ckpt.close()
