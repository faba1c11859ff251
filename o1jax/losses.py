"""The O1 Embedder losses (METHOD §3) as pure functions of hidden states, logits and embeddings.

All reductions are over the GLOBAL batch: called inside the jitted step on batch-sharded arrays, XLA inserts the
collectives (the score matrix needs every passage of every device), so the gradients are exact.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


def lm_targets(ids: jnp.ndarray, loss_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Next-token targets and weights aligned with logits[:, :-1]: position i predicts token i + 1, supervised
  when token i + 1 is (a thought token or its EOS)."""
  return ids[:, 1:], loss_mask[:, 1:].astype(jnp.float32)


def lm_loss_sum(logits: jnp.ndarray, ids: jnp.ndarray, loss_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Summed next-token cross-entropy over supervised tokens, and their count.

  Args:
    logits: [B, T, V] float32 (position i's prediction of token i + 1; the last position is unused).
    ids, loss_mask: [B, T]; loss_mask is 1 where the token itself is a supervised target.
  """
  targets, weights = lm_targets(ids, loss_mask)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


def lm_loss_sum_chunked(logits_of: Callable[[jnp.ndarray], jnp.ndarray], hidden: jnp.ndarray, ids: jnp.ndarray,
                        loss_mask: jnp.ndarray, chunk: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`lm_loss_sum(logits_of(hidden), ids, loss_mask)` without the [B, T, vocab] float32 logits: positions go
  through the head `chunk` at a time, and each chunk's logits are recomputed in the backward pass instead of kept.
  At a 150k vocabulary the whole logits and their gradient are 1.2 GB each for 8 x 256 positions.

  Args:
    logits_of: hidden states [B, C, D] -> float32 logits [B, C, vocab] (the LM head).
    hidden: [B, T, D] final hidden states; ids, loss_mask: [B, T] as for `lm_loss_sum`.
  """
  targets, weights = lm_targets(ids, loss_mask)
  batch, positions = targets.shape
  count = -(-positions // chunk)
  pad = count * chunk - positions

  def chunks(x):  # [B, T - 1, ...] -> [count, B, chunk, ...], padded with weight-0 positions
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((batch, count, chunk) + x.shape[2:]), 0, 1)

  @jax.checkpoint
  def chunk_sum(h, t, w):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_of(h).astype(jnp.float32), t)
    return jnp.sum(nll * w)

  def body(total, xs):
    return total + chunk_sum(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden[:, :-1]), chunks(targets), chunks(weights)))
  return total, jnp.sum(weights)


class ContrastiveOut(NamedTuple):
  loss: jnp.ndarray  # mean InfoNCE over queries
  acc_top1: jnp.ndarray  # fraction of queries whose positive outscores every other passage
  score_gap: jnp.ndarray  # mean cosine of positives minus mean cosine of all other passages
  scores: jnp.ndarray  # [Q, Q*G] float32 cosine scores (not divided by tau)


def contrastive(q_emb: jnp.ndarray, d_emb: jnp.ndarray, group_size: int, tau: float) -> ContrastiveOut:
  """InfoNCE of every query against every passage of the batch; query q's positive is passage q * G.

  Args:
    q_emb: [Q, D] normalised query embeddings.
    d_emb: [Q * G, D] normalised passage embeddings, grouped per query (positive first).
  """
  num_q = q_emb.shape[0]
  if d_emb.shape[0] != num_q * group_size:
    raise ValueError(f"{d_emb.shape[0]} passages for {num_q} queries of group size {group_size}")
  scores = jnp.einsum("qd,pd->qp", q_emb.astype(jnp.float32), d_emb.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  labels = jnp.arange(num_q) * group_size
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scores / tau, labels))
  positive = jnp.take_along_axis(scores, labels[:, None], axis=1)[:, 0]
  is_positive = jnp.arange(scores.shape[1])[None, :] == labels[:, None]
  acc = jnp.mean((jnp.argmax(scores, axis=1) == labels).astype(jnp.float32))
  negatives = scores.shape[1] - 1
  neg_mean = jnp.sum(jnp.where(is_positive, 0.0, scores)) / max(num_q * negatives, 1)
  return ContrastiveOut(loss, acc, jnp.mean(positive) - neg_mean, scores)


def distillation(scores: jnp.ndarray, teacher_scores: jnp.ndarray, group_size: int, tau: float) -> jnp.ndarray:
  """Mean over queries of KL(softmax(teacher) || softmax(student / tau)) over each query's own group.

  Args:
    scores: [Q, Q*G] student cosine scores from `contrastive`.
    teacher_scores: [Q, G] teacher logits for the query's positive and negatives (same order as the passages).
  """
  num_q = scores.shape[0]
  own = jnp.arange(num_q)[:, None] * group_size + jnp.arange(group_size)[None, :]
  student = jax.nn.log_softmax(jnp.take_along_axis(scores, own, axis=1) / tau, axis=-1)
  teacher = jax.nn.log_softmax(teacher_scores.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))
