"""The O1 Embedder training step: behavior cloning + contrastive learning in one sharded `jax.jit`.

One step, per (micro-)batch:
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

Gradient accumulation (`grad_accum_steps` = k) splits the global batch into k micro-batches of Q / k queries
(each with its own passages) and sums gradients of
    (w_ctr * L_ctr_m + w_distill * L_distill_m) / k + w_gen * nll_sum_m / N_gen
so L_gen is the token-level mean over the whole batch's N_gen supervised tokens (weighted by token count), and
the contrastive part is the mean of per-micro-batch losses. Accumulation adds NO negatives: each query only
competes with passages of its own micro-batch. GradCache (`gradcache_chunk` > 0) is the way to a larger
contrastive batch: it keeps the whole (micro-)batch in one InfoNCE while running the model on chunks.

Trainable parameters are selected per leaf; frozen leaves get no gradient computation, no optimizer state and
are returned untouched (bit-identical). The four special-token rows of the embeddings can be trained while the
rest of the vocabulary stays frozen (their gradient is masked to those rows).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from o1jax import gradcache, losses, lora, optim, sharding
from o1jax.model import Decoder, ModelConfig, init_params, logical_axes, pooling
from o1jax.tokenizer import SpecialIds

# Embedding leaves: (module, leaf name, vocabulary axis).
EMBEDDINGS = {"embed_tokens": ("embedding", 0), "lm_head": ("kernel", 1)}
# How the gradient of a leaf is used: all of it, only the special-token rows, or none (frozen).
FULL, ROWS, FROZEN = "full", "rows", "frozen"
QUERY_FIELDS = ("query_ids", "query_mask", "query_loss_mask")
DOC_FIELDS = ("doc_ids", "doc_mask")
METRICS = ("loss", "loss_ctr", "loss_gen", "loss_distill", "acc_top1", "score_gap", "grad_norm", "lr",
           "gen_tokens")


def _combine(train_part: Any, frozen_part: Any) -> Any:
  """Leaf-wise union of two trees that hold None where the other holds the leaf."""
  return jax.tree.map(lambda t, f: f if t is None else t, train_part, frozen_part, is_leaf=lambda x: x is None)


def _dict_key_suffix(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a key path (an optimizer-state leaf ends with its parameter's path)."""
  names: list[str] = []
  for key in reversed(path):
    if not isinstance(key, jax.tree_util.DictKey):
      break
    names.append(str(key.key))
  return tuple(reversed(names))


class Trainer:
  """Owns the optimizer, trainable-parameter selection, shardings and the jitted step of one training run."""

  def __init__(self, model_cfg: ModelConfig, config: Any, mesh: Mesh, special_ids: SpecialIds):
    train = config.train
    if train.finetune not in ("full", "lora"):
      raise ValueError(f"config.train.finetune={train.finetune!r}; expected 'full' or 'lora'")
    self.model_cfg, self.config, self.mesh, self.special_ids = model_cfg, config, mesh, special_ids
    self.model = Decoder(model_cfg)
    self.group_size = int(train.group_size)
    self.tau = float(train.tau)
    self.w_ctr, self.w_gen, self.w_distill = float(train.w_ctr), float(train.w_gen), float(train.w_distill)
    self.accum_steps = int(train.grad_accum_steps)
    self.chunk = int(train.gradcache_chunk)
    self.lora_cfg = dict(train.lora) if train.finetune == "lora" else None
    if self.lora_cfg is not None:
      self.lora_cfg["targets"] = lora.check_targets(list(self.lora_cfg["targets"]))

    abstract_params = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
    self.grad_use = self._grad_use(abstract_params, train)
    labels = jax.tree.map(lambda u: optim.FROZEN if u == FROZEN else optim.TRAIN, self.grad_use)
    self.optimizer = optim.make_optimizer(config.optim, int(train.steps), labels)
    self.schedule = optim.schedule(config.optim, int(train.steps))

    key_spec = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32)
    self.abstract_state = jax.eval_shape(self._init, key_spec, abstract_params)
    self.state_shardings = self._shardings(self.abstract_state, logical_axes(model_cfg))
    at_rest = {k: self.abstract_state[k] for k in ("params", "lora") if k in self.abstract_state}
    sharding.check_replication(at_rest, {k: self.state_shardings[k] for k in at_rest}, mesh)

    batch = sharding.batch_sharding(mesh)
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch),
                         out_shardings=(self.state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    self._grads_fn = jax.jit(self._loss_and_grads, in_shardings=(self.state_shardings, batch))
    self._embed = jax.jit(self._embed_fn)

  # ---------------------------------------------------------------- parameter selection and state

  def _grad_use(self, abstract_params: Any, train: Any) -> dict:
    """FULL / ROWS / FROZEN per leaf of the trainable tree {'params': ..., ('lora': ...)}."""
    if train.train_embeddings:
      embedding_use = FULL
    else:
      embedding_use = ROWS if train.train_special_tokens else FROZEN
    body_use = FULL if self.lora_cfg is None else FROZEN

    def use(path, _):
      return embedding_use if str(path[0].key) in EMBEDDINGS else body_use

    tree = {"params": jax.tree_util.tree_map_with_path(use, abstract_params)}
    if self.lora_cfg is not None:
      adapters = jax.eval_shape(lambda: lora.init(abstract_params, self.lora_cfg, jax.random.key(0)))
      tree["lora"] = jax.tree.map(lambda _: FULL, adapters)
    return tree

  def _init(self, rng_data: jax.Array, params: Any | None) -> dict:
    rng = jax.random.wrap_key_data(rng_data)
    if params is None:
      params = init_params(self.model_cfg, jax.random.fold_in(rng, 0))
    state = {"params": params}
    if self.lora_cfg is not None:
      state["lora"] = lora.init(params, self.lora_cfg, jax.random.fold_in(rng, 1))
    state["opt_state"] = self.optimizer.init(self._trainable(state))
    state["step"] = jnp.zeros((), jnp.int32)
    state["rng"] = jax.random.key_data(jax.random.fold_in(rng, 2))
    return state

  def _shardings(self, abstract_state: dict, model_axes: Any) -> dict:
    """Parameters by their logical axes; optimizer moments like the parameter they belong to; scalars replicated."""
    shardings = {"params": sharding.logical_to_shardings(model_axes, abstract_state["params"], self.mesh)}
    if self.lora_cfg is not None:
      shardings["lora"] = sharding.logical_to_shardings(lora.logical_axes(model_axes, self.lora_cfg),
                                                        abstract_state["lora"], self.mesh)
    by_path = {("params",) + _dict_key_suffix(p): s
               for p, s in jax.tree_util.tree_flatten_with_path(shardings["params"])[0]}
    if "lora" in shardings:
      by_path.update({("lora",) + _dict_key_suffix(p): s
                      for p, s in jax.tree_util.tree_flatten_with_path(shardings["lora"])[0]})
    params_shapes = {("params",) + _dict_key_suffix(p): x.shape
                     for p, x in jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}
    params_shapes.update({("lora",) + _dict_key_suffix(p): x.shape
                          for p, x in jax.tree_util.tree_flatten_with_path(abstract_state.get("lora", {}))[0]})
    rep = sharding.replicated(self.mesh)

    def opt_sharding(path, x):
      suffix = _dict_key_suffix(path)
      if suffix in by_path and params_shapes[suffix] == x.shape:
        return by_path[suffix]
      return rep

    shardings["opt_state"] = jax.tree_util.tree_map_with_path(opt_sharding, abstract_state["opt_state"])
    shardings["step"] = rep
    shardings["rng"] = rep
    return shardings

  def init_state(self, rng: jax.Array, params: Any | None = None) -> dict:
    """The sharded training state, built directly on the mesh (the full model never sits on one device).

    Args:
      rng: a PRNG key (typed or raw key data).
      params: None for random parameters, else host (numpy) parameters in the model's layout, placed onto the
        mesh shard by shard.
    """
    rng_data = rng if rng.dtype == jnp.uint32 else jax.random.key_data(rng)
    with self._context():
      rep = sharding.replicated(self.mesh)
      if params is None:
        init = jax.jit(lambda r: self._init(r, None), in_shardings=(rep,), out_shardings=self.state_shardings)
        return init(rng_data)
      placed = sharding.place(params, self.state_shardings["params"])
      init = jax.jit(self._init, in_shardings=(rep, self.state_shardings["params"]),
                     out_shardings=self.state_shardings)
      return init(rng_data, placed)

  def _trainable(self, state: Mapping[str, Any]) -> dict:
    return {k: state[k] for k in ("params", "lora") if k in state}

  def _split(self, trainable: dict) -> tuple[dict, dict]:
    """(trainable leaves, frozen leaves), each with None in the other's places."""
    train = jax.tree.map(lambda u, x: None if u == FROZEN else x, self.grad_use, trainable)
    frozen = jax.tree.map(lambda u, x: x if u == FROZEN else None, self.grad_use, trainable)
    return train, frozen

  @contextlib.contextmanager
  def _context(self) -> Iterator[None]:
    """Mesh and logical-axis rules, needed while tracing (the model constrains activations by logical names)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      yield

  # ---------------------------------------------------------------- forward passes

  def _apply(self, trainable: dict, method, *args, dropout_rng: jax.Array | None = None):
    params = trainable["params"]
    if self.lora_cfg is None:
      return self.model.apply({"params": params}, *args, method=method)
    rate = float(self.lora_cfg["dropout"])
    tree = lora.with_adapters(params, trainable["lora"], dropout_rng if rate > 0 else None)
    with lora.applied(lora.scale(self.lora_cfg), rate):
      return self.model.apply({"params": tree}, *args, method=method)

  def _query_terms(self, trainable: dict, q: Mapping[str, jnp.ndarray], rng: jax.Array,
                   with_lm: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(query embeddings [B, D], summed LM loss over the supervised tokens) from one pass."""
    ids, mask = q["query_ids"], q["query_mask"]
    hidden = self._apply(trainable, Decoder.__call__, ids, pooling.positions(mask), mask, dropout_rng=rng)
    emb = pooling.pool_last(hidden, mask)
    if not (with_lm and self.w_gen):
      return emb, jnp.zeros((), jnp.float32)
    logits = self._apply(trainable, Decoder.logits, hidden)
    nll_sum, _ = losses.lm_loss_sum(logits, ids, q["query_loss_mask"])
    return emb, nll_sum

  def _doc_embed(self, trainable: dict, d: Mapping[str, jnp.ndarray], rng: jax.Array) -> jnp.ndarray:
    ids, mask = d["doc_ids"], d["doc_mask"]
    hidden = self._apply(trainable, Decoder.__call__, ids, pooling.positions(mask), mask, dropout_rng=rng)
    return pooling.pool_last(hidden, mask)

  def _contrastive_objective(self, q_emb, d_emb, teacher) -> tuple[jnp.ndarray, dict]:
    """(this micro-batch's share of w_ctr * L_ctr + w_distill * L_distill, metric sums)."""
    out = losses.contrastive(q_emb, d_emb, self.group_size, self.tau)
    distill = jnp.zeros((), jnp.float32)
    if teacher is not None:
      distill = losses.distillation(out.scores, teacher, self.group_size, self.tau)
    objective = (self.w_ctr * out.loss + self.w_distill * distill) / self.accum_steps
    return objective, {"loss_ctr": out.loss, "loss_distill": distill, "acc_top1": out.acc_top1,
                       "score_gap": out.score_gap}

  # ---------------------------------------------------------------- gradients

  def _rows_sharded(self, x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Constrains dimension `axis` (rows) to the batch axes after a reshape."""
    spec = PartitionSpec(*([None] * axis), *sharding.mesh_spec(("activation_batch",), (x.shape[axis],),
                                                               self.mesh))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _micro_grads(self, train_part, frozen_part, mb: Mapping[str, jnp.ndarray], rng, n_gen) -> tuple[Any, dict]:
    """Gradients of one micro-batch's objective w.r.t. the trainable leaves, and its metric sums."""
    q = {k: mb[k] for k in QUERY_FIELDS}
    d = {k: mb[k] for k in DOC_FIELDS}
    teacher = mb.get("teacher_scores")
    rng_q, rng_d = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
    gen_weight = self.w_gen / jnp.maximum(n_gen, 1.0)
    if not self.chunk:
      def objective(tp):
        trainable = _combine(tp, frozen_part)
        q_emb, nll = self._query_terms(trainable, q, rng_q, with_lm=True)
        d_emb = self._doc_embed(trainable, d, rng_d)
        ctr, aux = self._contrastive_objective(q_emb, d_emb, teacher)
        return ctr + gen_weight * nll, {**aux, "nll_sum": nll}
      grads, aux = jax.grad(objective, has_aux=True)(train_part)
      return grads, aux

    trainable = _combine(train_part, frozen_part)
    nq, nd = q["query_ids"].shape[0] // self.chunk, d["doc_ids"].shape[0] // self.chunk
    q_chunks = jax.tree.map(lambda x: self._rows_sharded(gradcache.split_chunks(x, self.chunk), 1), q)
    d_chunks = jax.tree.map(lambda x: self._rows_sharded(gradcache.split_chunks(x, self.chunk), 1), d)
    q_emb = gradcache.embed_chunks(
        lambda c, i: self._query_terms(trainable, c, jax.random.fold_in(rng_q, i), with_lm=False)[0], q_chunks, nq)
    d_emb = gradcache.embed_chunks(
        lambda c, i: self._doc_embed(trainable, c, jax.random.fold_in(rng_d, i)), d_chunks, nd)
    (_, aux), (g_q, g_d) = jax.value_and_grad(self._contrastive_objective, argnums=(0, 1), has_aux=True)(
        q_emb, d_emb, teacher)

    def q_terms(tp, chunk, i):
      emb, nll = self._query_terms(_combine(tp, frozen_part), chunk, jax.random.fold_in(rng_q, i), with_lm=True)
      return emb, gen_weight * nll, nll

    def d_terms(tp, chunk, i):
      return self._doc_embed(_combine(tp, frozen_part), chunk, jax.random.fold_in(rng_d, i)), 0.0, ()

    grads = jax.tree.map(jnp.zeros_like, train_part)
    grads, nll = gradcache.backprop_chunks(q_terms, train_part, q_chunks, g_q, nq, grads)
    grads, _ = gradcache.backprop_chunks(d_terms, train_part, d_chunks, g_d, nd, grads)
    return grads, {**aux, "nll_sum": nll}

  def _micro_batches(self, batch: Mapping[str, jnp.ndarray]) -> dict:
    """[k, rows / k, ...] per field; micro-batch m holds queries m, m + k, ... (so it spans every device) and
    their passage groups."""
    k = self.accum_steps
    num_q = batch["query_ids"].shape[0]
    if num_q % k:
      raise ValueError(f"grad_accum_steps={k} does not divide the {num_q} queries of the batch")
    out = {}
    for name, x in batch.items():
      rows_per_query = x.shape[0] // num_q
      grouped = x.reshape((num_q // k, k, rows_per_query) + x.shape[1:])
      out[name] = self._rows_sharded(jnp.swapaxes(grouped, 0, 1).reshape((k, -1) + x.shape[1:]), 1)
    return out

  def _loss_and_grads(self, state: Mapping[str, Any], batch: Mapping[str, jnp.ndarray]) -> tuple[Any, dict]:
    """Masked gradients of the step objective w.r.t. the trainable leaves (None where frozen), and metrics."""
    self._check_batch(batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    train_part, frozen_part = self._split(self._trainable(state))
    n_gen = jnp.sum(losses.lm_targets(batch["query_ids"], batch["query_loss_mask"])[1])
    if self.accum_steps == 1:
      grads, aux = self._micro_grads(train_part, frozen_part, batch, rng, n_gen)
    else:
      def body(acc, xs):
        mb, index = xs
        g, a = self._micro_grads(train_part, frozen_part, mb, jax.random.fold_in(rng, index), n_gen)
        return jax.tree.map(jnp.add, acc, (g, a)), None
      zero = jax.eval_shape(lambda: self._micro_grads(
          train_part, frozen_part, jax.tree.map(lambda x: x[0], self._micro_batches(batch)), rng, n_gen))
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
      (grads, aux), _ = jax.lax.scan(body, zero, (self._micro_batches(batch), jnp.arange(self.accum_steps)))
    grads = self._mask_rows(grads)
    k = self.accum_steps
    loss_ctr, loss_distill = aux["loss_ctr"] / k, aux["loss_distill"] / k
    loss_gen = aux["nll_sum"] / jnp.maximum(n_gen, 1.0)
    metrics = {
        "loss": self.w_ctr * loss_ctr + self.w_gen * loss_gen + self.w_distill * loss_distill,
        "loss_ctr": loss_ctr, "loss_gen": loss_gen, "loss_distill": loss_distill,
        "acc_top1": aux["acc_top1"] / k, "score_gap": aux["score_gap"] / k,
        "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state["step"]), "gen_tokens": n_gen,
    }
    return grads, metrics

  def _mask_rows(self, grads: Any) -> Any:
    """Zeroes the gradient of every vocabulary row but the special tokens' on ROWS leaves."""
    special = [self.special_ids.query, self.special_ids.query_end, self.special_ids.thought, self.special_ids.emb]

    def mask(path, use, g):
      if use != ROWS:
        return g
      axis = EMBEDDINGS[str(path[1].key)][1]
      keep = jnp.zeros((g.shape[axis],), g.dtype).at[jnp.asarray(special)].set(1)
      return g * (keep[:, None] if axis == 0 else keep[None, :])

    return jax.tree_util.tree_map_with_path(mask, self.grad_use, grads, is_leaf=lambda x: x is None)

  def _check_batch(self, batch: Mapping[str, jnp.ndarray]) -> None:
    missing = [k for k in QUERY_FIELDS + DOC_FIELDS if k not in batch]
    if missing:
      raise ValueError(f"batch lacks fields {missing}")
    num_q, docs = batch["query_ids"].shape[0], batch["doc_ids"].shape[0]
    if docs != num_q * self.group_size:
      raise ValueError(f"batch: doc_ids has {docs} rows; expected queries ({num_q}) x group_size "
                       f"({self.group_size})")
    if "teacher_scores" in batch and batch["teacher_scores"].shape != (num_q, self.group_size):
      raise ValueError(f"batch: teacher_scores has shape {batch['teacher_scores'].shape}; expected "
                       f"({num_q}, {self.group_size})")

  # ---------------------------------------------------------------- the step

  def _train_step(self, state: dict, batch: Mapping[str, jnp.ndarray]) -> tuple[dict, dict]:
    grads, metrics = self._loss_and_grads(state, batch)
    trainable = self._trainable(state)
    # The optimizer sees the full tree; zeros at frozen leaves are dead code (never read), so XLA drops them.
    full_grads = jax.tree.map(lambda g, x: jnp.zeros_like(x) if g is None else g, grads, trainable,
                              is_leaf=lambda x: x is None)
    updates, opt_state = self.optimizer.update(full_grads, state["opt_state"], trainable)
    new = jax.tree.map(lambda use, x, u: x if use == FROZEN else optax.apply_updates(x, u),
                       self.grad_use, trainable, updates)
    return {**state, **new, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  def step(self, state: dict, batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
    """One optimizer step on a global batch from `shard_batch`; `state` is donated (do not reuse it)."""
    with self._context():
      return self._step(state, batch)

  def lower_step(self, state: Any, batch: Mapping[str, Any]) -> jax.stages.Lowered:
    """The step lowered for abstract (ShapeDtypeStruct) or concrete inputs: `.compile()` it for AOT memory and
    cost analysis without running anything."""
    with self._context():
      return self._step.lower(state, batch)

  def grads(self, state: dict, batch: Mapping[str, jax.Array]) -> tuple[Any, dict]:
    """(masked gradients of the trainable leaves, None where frozen; metrics) without updating: for checks."""
    with self._context():
      return self._grads_fn(state, batch)

  def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows (numpy) → global arrays sharded over the batch axes."""
    return sharding.shard_batch(host_batch, self.mesh)

  # ---------------------------------------------------------------- evaluation and accounting

  def _embed_fn(self, trainable: dict, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    hidden = self._apply(trainable, Decoder.__call__, ids, pooling.positions(mask), mask)
    return pooling.pool_last(hidden, mask)

  def embed(self, params_or_state: Mapping[str, Any], ids: Any, mask: Any) -> jax.Array:
    """Normalised float32 embeddings [N, D] at each row's last real token (no dropout).

    Accepts the training state, or a parameter tree (then without LoRA adapters). Rows are padded up to a
    multiple of the batch shards internally.
    """
    trainable = self._trainable(params_or_state) if "params" in params_or_state else {"params": params_or_state}
    if self.lora_cfg is not None and "lora" not in trainable:
      raise ValueError("a LoRA trainer embeds with the training state (or lora.merge the adapters first and "
                       "use a full-fine-tuning trainer)")
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    rows = ids.shape[0]
    padded = -(-rows // sharding.batch_shards(self.mesh)) * sharding.batch_shards(self.mesh)
    # Padding rows get one real token so that their (discarded) pooling index stays in range.
    pad_mask = np.zeros((padded - rows, mask.shape[1]), np.int32)
    pad_mask[:, 0] = 1
    ids = np.concatenate([ids, np.zeros((padded - rows, ids.shape[1]), np.int32)])
    mask = np.concatenate([mask, pad_mask])
    with self._context():
      placed = sharding.shard_batch({"ids": ids, "mask": mask}, self.mesh)
      return self._embed(trainable, placed["ids"], placed["mask"])[:rows]

  def flops_per_step(self, batch_shapes: Mapping[str, Any]) -> float:
    """Model FLOPs of one step on a global batch (the MFU numerator). Convention:

    * a matmul of a token's [k] activation with a [k, m] weight costs 2km forward, 2km for the input gradient
      and, only when the weight is trained, 2km for the weight gradient: 6 * params * tokens for full
      fine-tuning, 4 * params * tokens for frozen weights (LoRA base), adapters counted as trained matmuls;
    * attention QK^T and PV: 4 * T^2 * heads * head_dim per sequence and layer forward, x3 with backward, over
      the FULL T x T square (causality NOT halved: the kernel computes the square and masks);
    * the LM head on query tokens only (documents skip it; skipped entirely when w_gen = 0); embedding lookups
      free; padding tokens counted (they are computed);
    * remat recomputation and GradCache's extra no-grad embedding pass EXCLUDED (model FLOPs, not hardware).
    """
    def shape(name):
      x = batch_shapes[name]
      return tuple(x.shape) if hasattr(x, "shape") else tuple(x)

    cfg = self.model_cfg
    (nq, lq), (nd, ld) = shape("query_ids"), shape("doc_ids")
    tokens = nq * lq + nd * ld
    d, hd = cfg.hidden_size, cfg.head_dim
    layer_params = (d * cfg.num_attention_heads * hd * 2 + d * cfg.num_key_value_heads * hd * 2
                    + 3 * d * cfg.intermediate_size)
    body_factor = 6 if self.lora_cfg is None else 4
    flops = body_factor * cfg.num_hidden_layers * layer_params * tokens
    if self.lora_cfg is not None:
      adapters = jax.eval_shape(lambda: lora.init(self.abstract_state["params"], self.lora_cfg, jax.random.key(0)))
      lora_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
      flops += 6 * lora_params * tokens
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * hd
    flops += attention * (nq * lq * lq + nd * ld * ld)
    if self.w_gen:
      head_trained = jax.tree.leaves(self.grad_use["params"]["embed_tokens"])[0] != FROZEN
      flops += (6 if head_trained else 4) * d * cfg.vocab_size * nq * lq
    return float(flops)
