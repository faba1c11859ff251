"""The O1 Embedder objective: behavior cloning + contrastive learning from one forward pass, as pure functions.

Per (micro-)batch:
  * query+thought sequences run through the full model once: the LM loss on thought tokens + EOS, and the query
    embedding at `<emb>` from the same hidden states;
  * documents (positive, then hard negatives, per query) run through the backbone only (no LM head);
  * InfoNCE (tau) of every query against every passage of the GLOBAL batch, on batch-sharded arrays: XLA inserts
    the collectives, so gradients are exact with no hand-written all-gather.

Loss weights and the reference's lambda (METHOD §3). The reference optimises 0.8 * L_ctr + 0.2 * L_gen per rank,
where each rank's L_ctr scores its local queries against all-gathered passages but back-propagates only through
its local embeddings, and DDP then AVERAGES gradients over the W ranks. Summed over ranks the contrastive
gradients make the full-batch gradient once, so after the average its effective weight is 0.8 / W, while L_gen
(a per-rank mean, averaged) keeps 0.2. Our loss is one global function, so
    L = w_ctr * L_ctr + w_gen * L_gen + w_distill * L_distill
has exact gradients, and the reference on W = 8 GPUs corresponds to w_ctr = 0.8 / 8 = 0.1, w_gen = 0.2.

Gradient accumulation (`accum_steps` = k) splits the global batch into k micro-batches of Q / k queries
(each with its own passages) and sums gradients of
    (w_ctr * L_ctr_m + w_distill * L_distill_m) / k + w_gen * nll_sum_m / N_gen
so L_gen is the token-level mean over the whole batch's N_gen supervised tokens (weighted by token count), and
the contrastive part is the mean of per-micro-batch losses. Accumulation adds NO negatives: each query only
competes with passages of its own micro-batch. GradCache (`gradcache_chunk` > 0) is the way to a larger
contrastive batch: it keeps the whole (micro-)batch in one InfoNCE while running the model on chunks.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from o1jax import gradcache, lora, losses, sharding
from o1jax.data.batch import DOC_FIELDS, QUERY_FIELDS, TEACHER_FIELD, BatchShape
from o1jax.model import Decoder, ModelConfig, pooling
from o1jax.tokenizer import SpecialIds
from o1jax.training import trainable as trainable_lib

METRICS = ("loss", "loss_ctr", "loss_gen", "loss_distill", "acc_top1", "score_gap", "grad_norm", "lr",
           "gen_tokens")


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loss of METHOD §3 and how a batch is cut to compute it."""
  group_size: int = 16
  tau: float = 0.02
  w_ctr: float = 0.8
  w_gen: float = 0.2
  w_distill: float = 0.0
  accum_steps: int = 1
  gradcache_chunk: int = 0  # 0 = off
  lm_loss_chunk: int = 0  # query positions per pass of the LM head in the loss (0 = all at once)


@dataclasses.dataclass(frozen=True)
class Forward:
  """The model's forward passes over a trainable tree {'params': ..., ('lora': adapters)}."""
  model_cfg: ModelConfig
  lora: lora.LoraConfig | None = None

  def apply(self, trainable: Mapping[str, Any], method, *args, dropout_rng: jax.Array | None = None):
    model = Decoder(self.model_cfg)
    params = trainable["params"]
    if self.lora is None:
      return model.apply({"params": params}, *args, method=method)
    tree = lora.with_adapters(params, trainable["lora"], dropout_rng if self.lora.dropout > 0 else None)
    with lora.applied(self.lora.scale, self.lora.dropout):
      return model.apply({"params": tree}, *args, method=method)

  def hidden(self, trainable: Mapping[str, Any], ids: jnp.ndarray, mask: jnp.ndarray,
             rng: jax.Array | None = None) -> jnp.ndarray:
    return self.apply(trainable, Decoder.__call__, ids, pooling.positions(mask), mask, dropout_rng=rng)

  def query_terms(self, trainable: Mapping[str, Any], q: Mapping[str, jnp.ndarray], rng: jax.Array,
                  with_lm: bool, lm_loss_chunk: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(query embeddings [B, D], summed LM loss over the supervised tokens) from one pass; `lm_loss_chunk` > 0
    runs the LM head over that many positions at a time (`losses.lm_loss_sum_chunked`)."""
    ids, mask = q["query_ids"], q["query_mask"]
    hidden = self.hidden(trainable, ids, mask, rng)
    emb = pooling.pool_last(hidden, mask)
    if not with_lm:
      return emb, jnp.zeros((), jnp.float32)
    if lm_loss_chunk:
      logits_of = functools.partial(self.apply, trainable, Decoder.logits)
      return emb, losses.lm_loss_sum_chunked(logits_of, hidden, ids, q["query_loss_mask"], lm_loss_chunk)[0]
    logits = self.apply(trainable, Decoder.logits, hidden)
    nll_sum, _ = losses.lm_loss_sum(logits, ids, q["query_loss_mask"])
    return emb, nll_sum

  def doc_embed(self, trainable: Mapping[str, Any], d: Mapping[str, jnp.ndarray], rng: jax.Array) -> jnp.ndarray:
    return pooling.pool_last(self.hidden(trainable, d["doc_ids"], d["doc_mask"], rng), d["doc_mask"])


def contrastive_objective(objective: Objective, q_emb, d_emb, teacher) -> tuple[jnp.ndarray, dict]:
  """(this micro-batch's share of w_ctr * L_ctr + w_distill * L_distill, metric sums)."""
  out = losses.contrastive(q_emb, d_emb, objective.group_size, objective.tau)
  distill = jnp.zeros((), jnp.float32)
  if teacher is not None:
    distill = losses.distillation(out.scores, teacher, objective.group_size, objective.tau)
  share = (objective.w_ctr * out.loss + objective.w_distill * distill) / objective.accum_steps
  return share, {"loss_ctr": out.loss, "loss_distill": distill, "acc_top1": out.acc_top1,
                 "score_gap": out.score_gap}


def _rows_sharded(x: jnp.ndarray, axis: int, mesh: Mesh) -> jnp.ndarray:
  """Constrains dimension `axis` (rows) to the batch axes after a reshape."""
  spec = PartitionSpec(*([None] * axis), *sharding.mesh_spec(("activation_batch",), (x.shape[axis],), mesh))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def micro_grads(objective: Objective, forward: Forward, mesh: Mesh, train_part, frozen_part,
                mb: Mapping[str, jnp.ndarray], rng, n_gen) -> tuple[Any, dict]:
  """Gradients of one micro-batch's objective w.r.t. the trainable leaves, and its metric sums."""
  q = {k: mb[k] for k in QUERY_FIELDS}
  d = {k: mb[k] for k in DOC_FIELDS}
  teacher = mb.get(TEACHER_FIELD)
  rng_q, rng_d = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
  gen_weight = objective.w_gen / jnp.maximum(n_gen, 1.0)
  with_lm = bool(objective.w_gen)
  combine = trainable_lib.combine
  chunk = objective.gradcache_chunk
  if not chunk:
    def total(tp):
      trainable = combine(tp, frozen_part)
      q_emb, nll = forward.query_terms(trainable, q, rng_q, with_lm, objective.lm_loss_chunk)
      d_emb = forward.doc_embed(trainable, d, rng_d)
      ctr, aux = contrastive_objective(objective, q_emb, d_emb, teacher)
      return ctr + gen_weight * nll, {**aux, "nll_sum": nll}
    return jax.grad(total, has_aux=True)(train_part)

  trainable = combine(train_part, frozen_part)
  nq, nd = q["query_ids"].shape[0] // chunk, d["doc_ids"].shape[0] // chunk
  q_chunks = jax.tree.map(lambda x: _rows_sharded(gradcache.split_chunks(x, chunk), 1, mesh), q)
  d_chunks = jax.tree.map(lambda x: _rows_sharded(gradcache.split_chunks(x, chunk), 1, mesh), d)
  q_emb = gradcache.embed_chunks(
      lambda c, i: forward.query_terms(trainable, c, jax.random.fold_in(rng_q, i), with_lm=False)[0], q_chunks, nq)
  d_emb = gradcache.embed_chunks(lambda c, i: forward.doc_embed(trainable, c, jax.random.fold_in(rng_d, i)),
                                 d_chunks, nd)
  (_, aux), (g_q, g_d) = jax.value_and_grad(
      lambda qe, de: contrastive_objective(objective, qe, de, teacher), argnums=(0, 1), has_aux=True)(q_emb, d_emb)

  def q_terms(tp, c, i):
    emb, nll = forward.query_terms(combine(tp, frozen_part), c, jax.random.fold_in(rng_q, i), with_lm,
                                   objective.lm_loss_chunk)
    return emb, gen_weight * nll, nll

  def d_terms(tp, c, i):
    return forward.doc_embed(combine(tp, frozen_part), c, jax.random.fold_in(rng_d, i)), 0.0, ()

  grads = jax.tree.map(jnp.zeros_like, train_part)
  grads, nll = gradcache.backprop_chunks(q_terms, train_part, q_chunks, g_q, nq, grads)
  grads, _ = gradcache.backprop_chunks(d_terms, train_part, d_chunks, g_d, nd, grads)
  return grads, {**aux, "nll_sum": nll}


def micro_batches(batch: Mapping[str, jnp.ndarray], k: int, mesh: Mesh) -> dict:
  """[k, rows / k, ...] per field; micro-batch m holds queries m, m + k, ... (so it spans every device) and
  their passage groups."""
  num_q = batch["query_ids"].shape[0]
  if num_q % k:
    raise ValueError(f"grad_accum_steps={k} does not divide the {num_q} queries of the batch")
  out = {}
  for name, x in batch.items():
    rows_per_query = x.shape[0] // num_q
    grouped = x.reshape((num_q // k, k, rows_per_query) + x.shape[1:])
    out[name] = _rows_sharded(jnp.swapaxes(grouped, 0, 1).reshape((k, -1) + x.shape[1:]), 1, mesh)
  return out


def loss_and_grads(objective: Objective, forward: Forward, mesh: Mesh, grad_use: dict, special: SpecialIds,
                   schedule: Callable[[jax.Array], jax.Array], state: Mapping[str, Any],
                   batch: Mapping[str, jnp.ndarray]) -> tuple[Any, dict]:
  """Masked gradients of the step objective w.r.t. the trainable leaves (None where frozen), and metrics."""
  BatchShape.of(batch, objective.group_size)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  train_part, frozen_part = trainable_lib.split(grad_use, trainable_lib.trainable_part(state))
  n_gen = jnp.sum(losses.lm_targets(batch["query_ids"], batch["query_loss_mask"])[1])
  k = objective.accum_steps

  def grads_of(mb, micro_rng):
    return micro_grads(objective, forward, mesh, train_part, frozen_part, mb, micro_rng, n_gen)

  if k == 1:
    grads, aux = grads_of(batch, rng)
  else:
    micro = micro_batches(batch, k, mesh)

    def body(acc, xs):
      mb, index = xs
      return jax.tree.map(jnp.add, acc, grads_of(mb, jax.random.fold_in(rng, index))), None

    zero = jax.eval_shape(lambda: grads_of(jax.tree.map(lambda x: x[0], micro), rng))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    (grads, aux), _ = jax.lax.scan(body, zero, (micro, jnp.arange(k)))
  grads = trainable_lib.mask_rows(grad_use, grads, special)
  loss_ctr, loss_distill = aux["loss_ctr"] / k, aux["loss_distill"] / k
  loss_gen = aux["nll_sum"] / jnp.maximum(n_gen, 1.0)
  metrics = {
      "loss": objective.w_ctr * loss_ctr + objective.w_gen * loss_gen + objective.w_distill * loss_distill,
      "loss_ctr": loss_ctr, "loss_gen": loss_gen, "loss_distill": loss_distill,
      "acc_top1": aux["acc_top1"] / k, "score_gap": aux["score_gap"] / k,
      "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]), "gen_tokens": n_gen,
  }
  return grads, metrics
