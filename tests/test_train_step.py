"""The sharded training step on 8 fake CPU devices against a one-device run, and its memory and fine-tuning modes.

Every trainer here shares one tiny model (2 layers, hidden 32, untied LM head) and one batch that carries
teacher scores, so each compiled step exercises L_ctr, L_gen and distillation together. Compiles are few and
module-scoped.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from o1jax import config as o1config, optim, sharding
from o1jax.data.batch import BatchShape
from o1jax.retrieval.embedder import SequenceEmbedder
from o1jax.training import objective, trainable
from o1jax.training.trainer import Trainer
from o1jax.model import Decoder, ModelConfig
from o1jax.tokenizer import SpecialIds

TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
SPECIAL = SpecialIds(query=60, query_end=61, thought=62, emb=63, eos=2, bos=1, pad=0)
SPECIAL_ROWS = [60, 61, 62, 63]
Q, G, LQ, LD = 16, 2, 12, 10


def make_config(**train) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 0,
      "train": {
          "steps": 10, "batch_queries": Q, "group_size": G, "tau": 0.05, "w_ctr": 1.0, "w_gen": 0.5,
          "w_distill": 0.3, "thought_drop": 0.1, "grad_accum_steps": 1, "gradcache_chunk": 0, "lm_loss_chunk": 0,
          "finetune": "full",
          "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]},
          "train_special_tokens": True, "train_embeddings": False, **train},
      "optim": {"lr": 1e-2, "warmup_frac": 0.0, "warmup": "linear", "decay": "linear", "weight_decay": 0.01,
                "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_norm": 1.0},
  })


def make_settings(**train):
  return o1config.trainer_settings(make_config(**train))


def make_mesh(data, fsdp, tensor):
  return sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def _rows(rs, n, length, lo):
  """Right-padded rows of random lengths >= lo ending in <emb>."""
  ids = rs.randint(3, 60, (n, length)).astype(np.int32)
  mask = np.zeros((n, length), np.int32)
  for i in range(n):
    real = rs.randint(lo, length + 1)
    mask[i, :real] = 1
    ids[i, real - 1] = SPECIAL.emb
    ids[i, real:] = SPECIAL.pad
  return ids, mask


def make_batch(seed=0) -> dict:
  rs = np.random.RandomState(seed)
  qi, qm = _rows(rs, Q, LQ, 5)
  # Thought tokens + EOS supervised from position 4 up to (not including) <emb>; every 4th row thought-dropped.
  ql = np.zeros_like(qm)
  for i in range(Q):
    if i % 4:
      ql[i, 4:qm[i].sum() - 1] = 1
  di, dm = _rows(rs, Q * G, LD, 3)
  return {"query_ids": qi, "query_mask": qm, "query_loss_mask": ql, "doc_ids": di, "doc_mask": dm,
          "teacher_scores": rs.randn(Q, G).astype(np.float32)}


@pytest.fixture(scope="module")
def batch():
  return make_batch()


@pytest.fixture(scope="module")
def baseline(batch):
  """One-device run: host parameters, gradients, metrics, and the state after one step."""
  trainer = Trainer(TINY, make_settings(), make_mesh(1, 1, 1), SPECIAL)
  state = trainer.init_state(jax.random.key(0))
  params = jax.device_get(state["params"])
  grads, metrics = jax.device_get(trainer.grads(state, trainer.shard_batch(batch)))
  new_state, step_metrics = jax.device_get(trainer.step(state, trainer.shard_batch(batch)))
  return {"params": params, "grads": grads, "metrics": metrics, "state": new_state, "step_metrics": step_metrics}


def assert_trees_close(actual, expected, rtol=2e-4, atol=2e-6):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def assert_metrics_close(actual, expected, keys=objective.METRICS):
  for key in keys:
    np.testing.assert_allclose(float(actual[key]), float(expected[key]), rtol=2e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (8, 1, 1)])
def test_sharded_gradients_match_one_device(shape, batch, baseline):
  trainer = Trainer(TINY, make_settings(), make_mesh(*shape), SPECIAL)
  state = trainer.init_state(jax.random.key(0), baseline["params"])
  grads, metrics = trainer.grads(state, trainer.shard_batch(batch))
  assert_metrics_close(metrics, baseline["metrics"])
  assert_trees_close(grads, baseline["grads"])


def test_sharded_step_matches_one_device(batch, baseline):
  trainer = Trainer(TINY, make_settings(), make_mesh(2, 2, 2), SPECIAL)
  state = trainer.init_state(jax.random.key(0), baseline["params"])
  new_state, metrics = trainer.step(state, trainer.shard_batch(batch))
  assert_metrics_close(metrics, baseline["step_metrics"])
  # Adam's first update is about lr * sign(g): tiny gradients amplify fp32 reduction-order noise, so compare
  # against a fraction of lr (1e-2) rather than relatively.
  assert_trees_close(new_state["params"], baseline["state"]["params"], rtol=0, atol=1e-4)
  assert int(new_state["step"]) == 1
  for key in ("loss", "loss_ctr", "loss_gen", "loss_distill"):
    assert np.isfinite(metrics[key]) and metrics[key] > 0, key
  assert metrics["gen_tokens"] == (batch["query_loss_mask"][:, 1:]).sum()


def test_step_updates_only_special_token_rows_of_frozen_embeddings(baseline):
  before, after = baseline["params"], baseline["state"]["params"]
  for name, axis in (("embed_tokens", 0), ("lm_head", 1)):
    leaf = trainable.EMBEDDINGS[name][0]
    b, a = np.moveaxis(before[name][leaf], axis, 0), np.moveaxis(after[name][leaf], axis, 0)
    other = np.setdiff1d(np.arange(TINY.vocab_size), SPECIAL_ROWS)
    np.testing.assert_array_equal(a[other], b[other], err_msg=name)
    assert not np.allclose(a[SPECIAL_ROWS], b[SPECIAL_ROWS]), name
  assert not np.allclose(after["layers"]["mlp"]["up_proj"]["kernel"], before["layers"]["mlp"]["up_proj"]["kernel"])


def test_state_is_sharded_by_the_rules(baseline):
  mesh = make_mesh(2, 2, 2)
  trainer = Trainer(TINY, make_settings(), mesh, SPECIAL)
  shardings = trainer.state_shardings
  q_proj = shardings["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_proj.spec == PartitionSpec(None, "fsdp", "tensor")
  assert shardings["params"]["embed_tokens"]["embedding"].spec == PartitionSpec("tensor", "fsdp")
  # Adam moments follow their parameter; the step counter is replicated.
  mu = [s for p, s in jax.tree_util.tree_flatten_with_path(shardings["opt_state"])[0]
        if "mu" in jax.tree_util.keystr(p) and "q_proj" in jax.tree_util.keystr(p)]
  assert mu == [q_proj]
  assert shardings["step"].is_fully_replicated
  frac = sharding.check_replication(trainer.abstract_state["params"], shardings["params"], mesh)
  assert 0 < frac < sharding.MAX_REPLICATED_FRACTION


def test_init_is_deterministic_and_places_given_params(baseline):
  trainer = Trainer(TINY, make_settings(), make_mesh(1, 8, 1), SPECIAL)
  random_a = jax.device_get(trainer.init_state(jax.random.key(0))["params"])
  random_b = jax.device_get(trainer.init_state(jax.random.key(0))["params"])
  assert_trees_close(random_a, random_b, rtol=0, atol=0)
  placed = trainer.init_state(jax.random.key(1), baseline["params"])
  assert_trees_close(jax.device_get(placed["params"]), baseline["params"], rtol=0, atol=0)
  assert placed["params"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp")


def test_gradcache_gradients_equal_plain_gradients(batch, baseline):
  trainer = Trainer(TINY, make_settings(gradcache_chunk=8), make_mesh(2, 2, 2), SPECIAL)
  state = trainer.init_state(jax.random.key(0), baseline["params"])
  grads, metrics = trainer.grads(state, trainer.shard_batch(batch))
  assert_metrics_close(metrics, baseline["metrics"])
  assert_trees_close(grads, baseline["grads"])


@pytest.mark.parametrize("train", [dict(lm_loss_chunk=4), dict(lm_loss_chunk=5, gradcache_chunk=8)])
def test_chunked_lm_loss_gradients_equal_plain_gradients(batch, baseline, train):
  """The LM head over 4 or 5 positions at a time (5 does not divide the 11 predicting positions), alone and inside
  GradCache's chunks, on a sharded mesh: the same loss, metrics and gradients as the whole logits at once."""
  trainer = Trainer(TINY, make_settings(**train), make_mesh(2, 2, 2), SPECIAL)
  state = trainer.init_state(jax.random.key(0), baseline["params"])
  grads, metrics = trainer.grads(state, trainer.shard_batch(batch))
  assert_metrics_close(metrics, baseline["metrics"])
  assert_trees_close(grads, baseline["grads"])


def test_accumulation_weights_lm_loss_by_token_count(batch):
  """With only L_gen, k micro-batches must give the gradient of the whole batch's token-level mean, although
  the two micro-batches hold very different numbers of supervised tokens."""
  uneven = dict(batch)
  uneven["query_loss_mask"] = batch["query_loss_mask"].copy()
  uneven["query_loss_mask"][1::2] = 0  # micro-batch 1 (odd queries) keeps no supervised token
  mesh = make_mesh(4, 1, 1)
  plain = Trainer(TINY, make_settings(w_ctr=0.0, w_distill=0.0), mesh, SPECIAL)
  accum = Trainer(TINY, make_settings(w_ctr=0.0, w_distill=0.0, grad_accum_steps=2), mesh, SPECIAL)
  params = jax.device_get(plain.init_state(jax.random.key(3))["params"])
  g_plain, m_plain = plain.grads(plain.init_state(jax.random.key(0), params), plain.shard_batch(uneven))
  g_accum, m_accum = accum.grads(accum.init_state(jax.random.key(0), params), accum.shard_batch(uneven))
  assert_metrics_close(m_accum, m_plain, keys=("loss", "loss_gen", "gen_tokens", "grad_norm"))
  assert_trees_close(g_accum, g_plain)
  # The contrastive metrics are per micro-batch (fewer negatives), so they differ from the full batch's.
  assert not np.isclose(float(m_accum["loss_ctr"]), float(m_plain["loss_ctr"]))


def test_lora_starts_at_the_base_model_and_trains_only_adapters(batch, baseline):
  trainer = Trainer(TINY, make_settings(finetune="lora", train_special_tokens=False), make_mesh(2, 2, 2), SPECIAL)
  state = trainer.init_state(jax.random.key(0), baseline["params"])
  lora_before = jax.device_get(state["lora"])
  # Frozen base: the optimizer holds moments for the adapters only.
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(lora_before))
  new_state, metrics = trainer.step(state, trainer.shard_batch(batch))
  # B = 0: the first step sees exactly the base model.
  assert_metrics_close(metrics, baseline["step_metrics"], keys=("loss_ctr", "loss_gen", "loss_distill"))
  assert_trees_close(jax.device_get(new_state["params"]), baseline["params"], rtol=0, atol=0)
  lora_after = jax.device_get(new_state["lora"])
  for target in ("q_proj", "v_proj", "o_proj"):
    assert not np.allclose(lora_after["layers"]["self_attn"][target]["lora_b"], 0), target
  assert not np.allclose(lora_after["layers"]["mlp"]["down_proj"]["lora_b"], 0)


def test_embed_pads_rows_and_matches_the_model(baseline):
  trainer = Trainer(TINY, make_settings(), make_mesh(2, 2, 2), SPECIAL)
  ids, mask = _rows(np.random.RandomState(7), 5, LD, 2)  # 5 rows: not a multiple of the 4 batch shards
  params = trainer.inference_params(trainer.init_state(jax.random.key(0), baseline["params"]))
  embedder = SequenceEmbedder(TINY, jax.device_get(params), trainer.mesh)
  got = embedder.embed([row[:real] for row, real in zip(ids, mask.sum(1))])
  hidden = np.asarray(Decoder(TINY).apply({"params": baseline["params"]}, ids, np.maximum(mask.cumsum(1) - 1, 0),
                                          mask), np.float64)
  last = hidden[np.arange(5), mask.sum(1) - 1]
  np.testing.assert_allclose(got, last / np.linalg.norm(last, axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_bad_batch_names_the_field(batch):
  trainer = Trainer(TINY, make_settings(), make_mesh(1, 1, 1), SPECIAL)
  state = trainer.init_state(jax.random.key(0))
  short = {**batch, "doc_ids": batch["doc_ids"][:Q], "doc_mask": batch["doc_mask"][:Q]}
  with pytest.raises(ValueError, match="doc_ids has 16 rows"):
    trainer.grads(state, trainer.shard_batch(short))
  with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
    sharding.shard_batch({k: v[:4] for k, v in batch.items()}, make_mesh(8, 1, 1))


def test_flops_per_step_convention():
  full = Trainer(TINY, make_settings(), make_mesh(1, 1, 1), SPECIAL)
  shapes = BatchShape(Q, G, LQ, LD)
  tokens = Q * LQ + Q * G * LD
  layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64  # q, o; k, v; gate, up, down
  attention = 12 * 2 * 4 * 8 * (Q * LQ * LQ + Q * G * LD * LD)
  head = 6 * 32 * 64 * Q * LQ  # special-token rows trained: the head's weight gradient is computed
  assert full.flops_per_step(shapes) == 6 * 2 * layer * tokens + attention + head
  lora_trainer = Trainer(TINY, make_settings(finetune="lora", train_special_tokens=False),
                                    make_mesh(1, 1, 1), SPECIAL)
  adapters = 2 * 4 * ((32 + 32) * 2 + (32 + 16) + (64 + 32))  # layers * rank * (in + out) per target
  assert lora_trainer.flops_per_step(shapes) == (4 * 2 * layer * tokens + 6 * adapters * tokens + attention
                                                 + 4 * 32 * 64 * Q * LQ)


def test_schedule_values_by_hand():
  base = {"lr": 1.0, "warmup_frac": 0.25, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "clip_norm": 1.0}
  lin = optim.schedule(optim.OptimConfig(**base, warmup="linear", decay="linear"), 8)
  assert [float(lin(s)) for s in range(9)] == pytest.approx([0, 0.5, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0])
  log = optim.schedule(optim.OptimConfig(**base, warmup="log", decay="cosine"), 8)
  assert float(log(0)) == 0 and float(log(1)) == pytest.approx(np.log(2) / np.log(2))
  assert float(log(2)) == pytest.approx(1.0)
  assert float(log(5)) == pytest.approx(0.5)  # halfway through the cosine
  assert float(log(8)) == pytest.approx(0.0, abs=1e-7)
  with pytest.raises(ValueError, match="config.optim.warmup"):
    optim.schedule(optim.OptimConfig(**base, warmup="exp", decay="linear"), 8)


def test_weight_decay_mask():
  params = {"params": {"embed_tokens": {"embedding": jnp.zeros((4, 2))}, "norm": {"weight": jnp.zeros(2)},
                       "layers": {"input_layernorm": {"weight": jnp.zeros((2, 2))},
                                  "self_attn": {"q_proj": {"kernel": jnp.zeros((2, 2, 2)), "bias": jnp.zeros((2, 2))}}},
                       "lm_head": {"kernel": jnp.zeros((2, 4))}},
            "lora": {"layers": {"self_attn": {"q_proj": {"lora_a": jnp.zeros((2, 2, 1))}}}}}
  mask = optim.decay_mask(params)
  assert mask == {"params": {"embed_tokens": {"embedding": False}, "norm": {"weight": False},
                             "layers": {"input_layernorm": {"weight": False},
                                        "self_attn": {"q_proj": {"kernel": True, "bias": False}}},
                             "lm_head": {"kernel": False}},
                  "lora": {"layers": {"self_attn": {"q_proj": {"lora_a": True}}}}}


def test_clip_norm_zero_means_no_clipping():
  base = {"lr": 0.1, "warmup_frac": 0.0, "warmup": "linear", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
          "weight_decay": 0.0}
  params = {"params": {"w": jnp.array([1.0, -2.0])}}
  labels = {"params": {"w": optim.TRAIN}}
  grads = {"params": {"w": jnp.array([300.0, -400.0])}}  # global norm 500

  def first_update(clip_norm):
    tx = optim.make_optimizer(optim.OptimConfig(**base, clip_norm=clip_norm), 10, labels)
    return tx.update(grads, tx.init(params), params)[0]["params"]["w"]

  plain = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  want = plain.update(grads["params"], plain.init(params["params"]), params["params"])[0]["w"]
  np.testing.assert_allclose(first_update(0.0), want, rtol=1e-6)
  clipped = optax.chain(optax.clip_by_global_norm(1e-3), plain)
  np.testing.assert_allclose(first_update(1e-3), clipped.update(grads["params"], clipped.init(params["params"]),
                                                                params["params"])[0]["w"], rtol=1e-6)
  assert jax.tree.structure(optim.make_optimizer(optim.OptimConfig(**base, clip_norm=0.0), 10, labels).init(params)) \
      == jax.tree.structure(optim.make_optimizer(optim.OptimConfig(**base, clip_norm=1.0), 10, labels).init(params))
