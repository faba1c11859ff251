"""The losses against plain numpy: InfoNCE over a batch sharded on 8 devices (values and analytic gradients),
the behavior-cloning mask by hand, distillation KL, `<emb>` pooling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from o1jax import losses, sharding
from o1jax.model import pooling

Q, G, D, TAU = 8, 4, 16, 0.05


def _normalised(rs, n):
  x = rs.randn(n, D)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_infonce(q, d):
  """Loss and analytic gradients: dL/dq_i = (sum_p P_ip d_p - d_pos(i)) / (tau Q), and symmetrically for d."""
  logits = q @ d.T / TAU
  labels = np.arange(Q) * G
  logp = _log_softmax(logits)
  loss = -logp[np.arange(Q), labels].mean()
  dlogits = np.exp(logp)
  dlogits[np.arange(Q), labels] -= 1
  dlogits /= Q * TAU
  return loss, dlogits @ d, dlogits.T @ q


@pytest.fixture(scope="module")
def embeddings():
  rs = np.random.RandomState(0)
  return _normalised(rs, Q).astype(np.float32), _normalised(rs, Q * G).astype(np.float32)


def test_contrastive_with_cross_device_negatives_equals_whole_batch(embeddings):
  q, d = embeddings
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  q_sharded, d_sharded = jax.device_put(q, rows), jax.device_put(d, rows)
  assert len(q_sharded.sharding.device_set) == 8
  loss_fn = jax.jit(jax.value_and_grad(lambda a, b: losses.contrastive(a, b, G, TAU).loss, argnums=(0, 1)))
  loss, (gq, gd) = loss_fn(q_sharded, d_sharded)
  want_loss, want_gq, want_gd = numpy_infonce(q.astype(np.float64), d.astype(np.float64))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gq), want_gq, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gd), want_gd, rtol=1e-4, atol=1e-6)


def test_contrastive_metrics(embeddings):
  q, d = embeddings
  d = d.copy()
  d[::G] = q  # every positive is the query itself: cosine 1, top-1 everywhere
  out = losses.contrastive(jnp.asarray(q), jnp.asarray(d), G, TAU)
  scores = q @ d.T
  negatives = np.arange(Q * G)[None, :] != (np.arange(Q) * G)[:, None]  # other queries' positives included
  assert float(out.acc_top1) == 1.0
  np.testing.assert_allclose(float(out.score_gap), 1.0 - scores[negatives].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="group size"):
    losses.contrastive(jnp.asarray(q), jnp.asarray(d[:-1]), G, TAU)


def test_distillation_is_kl_over_own_group(embeddings):
  q, d = embeddings
  teacher = np.random.RandomState(1).randn(Q, G).astype(np.float32)
  scores = q @ d.T
  own = scores.reshape(Q, Q, G)[np.arange(Q), np.arange(Q)]  # query i's own passages
  t, s = _log_softmax(teacher.astype(np.float64)), _log_softmax(own / TAU)
  want = (np.exp(t) * (t - s)).sum(axis=1).mean()
  got = losses.distillation(jnp.asarray(scores), jnp.asarray(teacher), G, TAU)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _lm_case():
  rs = np.random.RandomState(2)
  ids = rs.randint(0, 11, (3, 7)).astype(np.int32)
  # Row 0: thought tokens at 3, 4 and EOS at 5; row 1: thought-dropped (all zero); row 2: one token + EOS.
  loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0], [0] * 7, [0, 0, 0, 0, 1, 1, 0]], np.int32)
  logits = rs.randn(3, 7, 11).astype(np.float32)
  return ids, loss_mask, logits


def test_lm_loss_supervises_exactly_thought_tokens_and_eos():
  ids, loss_mask, logits = _lm_case()
  total, count = losses.lm_loss_sum(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(loss_mask))
  # By hand: position t - 1 predicts supervised token t.
  logp = _log_softmax(logits.astype(np.float64))
  targets = [(0, 3), (0, 4), (0, 5), (2, 4), (2, 5)]
  want = -sum(logp[b, t - 1, ids[b, t]] for b, t in targets)
  assert float(count) == len(targets)
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  # Perturbing the logits at a position that predicts no supervised token changes nothing ...
  predicting = {(b, t - 1) for b, t in targets}
  for b in range(3):
    for t in range(7):
      bumped = logits.copy()
      bumped[b, t] += np.linspace(-3, 3, 11, dtype=np.float32)
      new_total, _ = losses.lm_loss_sum(jnp.asarray(bumped), jnp.asarray(ids), jnp.asarray(loss_mask))
      if (b, t) in predicting:
        assert float(new_total) != pytest.approx(float(total)), (b, t)
      else:
        assert float(new_total) == float(total), (b, t)


def test_thought_dropped_rows_give_no_lm_loss_or_gradient():
  ids, loss_mask, logits = _lm_case()
  grad = jax.grad(lambda x: losses.lm_loss_sum(x, jnp.asarray(ids), jnp.asarray(loss_mask))[0])(jnp.asarray(logits))
  assert not np.any(np.asarray(grad)[1])
  assert np.any(np.asarray(grad)[0]) and np.any(np.asarray(grad)[2])


@pytest.mark.parametrize("chunk", [1, 4, 6, 50])
def test_chunked_lm_loss_equals_the_hand_computed_loss_and_its_gradients(chunk):
  """A linear head over hidden states, in chunks that divide the 6 predicting positions or not, or exceed them:
  the loss by hand, and the gradients (hidden states and head) of the whole-logits loss."""
  ids, loss_mask, _ = _lm_case()
  rs = np.random.RandomState(4)
  hidden, head = rs.randn(3, 7, 5).astype(np.float32), rs.randn(5, 11).astype(np.float32)
  logp = _log_softmax(hidden.astype(np.float64) @ head.astype(np.float64))
  want = -sum(logp[b, t - 1, ids[b, t]] for b in range(3) for t in range(1, 7) if loss_mask[b, t])

  def chunked(h, w):
    return losses.lm_loss_sum_chunked(lambda x: x @ w, h, jnp.asarray(ids), jnp.asarray(loss_mask), chunk)

  total, count = chunked(jnp.asarray(hidden), jnp.asarray(head))
  assert float(count) == loss_mask[:, 1:].sum()
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  whole = jax.grad(lambda h, w: losses.lm_loss_sum(h @ w, jnp.asarray(ids), jnp.asarray(loss_mask))[0], (0, 1))
  for got, expected in zip(jax.grad(lambda h, w: chunked(h, w)[0], (0, 1))(hidden, head), whole(hidden, head)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_pool_last_reads_the_emb_position_and_normalises():
  rs = np.random.RandomState(3)
  hidden = rs.randn(2, 5, 4).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  got = np.asarray(pooling.pool_last(jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(mask)))
  assert got.dtype == np.float32
  want = np.asarray(jnp.asarray(hidden, jnp.bfloat16).astype(jnp.float32))[[0, 1], [2, 4]]
  np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(pooling.positions(jnp.asarray(mask))), [[0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
