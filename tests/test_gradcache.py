"""GradCache's three stages against plain back-propagation through the whole batch, on a small two-tower
encoder whose batch exceeds one chunk (the full-model check is in test_train_step.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax import gradcache, losses

Q, G, IN, D, CHUNK = 8, 2, 6, 5, 4


def encode(params, x):
  h = jnp.tanh(x @ params["w1"]) @ params["w2"]
  return h / jnp.linalg.norm(h, axis=-1, keepdims=True)


def extra_loss(params, x):
  # Stands in for a query chunk's L_gen share: a per-row term that needs the same forward pass.
  return jnp.sum(jnp.tanh(x @ params["w1"]) ** 2) * 0.01


@pytest.fixture(scope="module")
def problem():
  rs = np.random.RandomState(0)
  params = {"w1": jnp.asarray(rs.randn(IN, 7), jnp.float32), "w2": jnp.asarray(rs.randn(7, D), jnp.float32)}
  return params, jnp.asarray(rs.randn(Q, IN), jnp.float32), jnp.asarray(rs.randn(Q * G, IN), jnp.float32)


def test_split_and_join_are_inverse_and_strided():
  x = jnp.arange(12).reshape(6, 2)
  chunks = gradcache.split_chunks(x, 2)
  assert chunks.shape == (3, 2, 2)
  np.testing.assert_array_equal(np.asarray(chunks[0]), [[0, 1], [6, 7]])  # rows 0 and 3
  np.testing.assert_array_equal(np.asarray(gradcache.join_chunks(chunks)), np.asarray(x))
  with pytest.raises(ValueError, match="gradcache_chunk=4"):
    gradcache.split_chunks(x, 4)


def test_gradcache_gradients_equal_plain_gradients(problem):
  params, queries, docs = problem

  def plain(p):
    return losses.contrastive(encode(p, queries), encode(p, docs), G, 0.1).loss + extra_loss(p, queries)

  want_loss, want = jax.value_and_grad(plain)(params)

  @jax.jit
  def cached(p):
    q_chunks, d_chunks = gradcache.split_chunks(queries, CHUNK), gradcache.split_chunks(docs, CHUNK)
    nq, nd = Q // CHUNK, Q * G // CHUNK
    q_emb = gradcache.embed_chunks(lambda c, i: encode(p, c), q_chunks, nq)
    d_emb = gradcache.embed_chunks(lambda c, i: encode(p, c), d_chunks, nd)
    ctr, (g_q, g_d) = jax.value_and_grad(lambda a, b: losses.contrastive(a, b, G, 0.1).loss, argnums=(0, 1))(
        q_emb, d_emb)
    grads = jax.tree.map(jnp.zeros_like, p)
    grads, extra = gradcache.backprop_chunks(
        lambda pp, c, i: (encode(pp, c), extra_loss(pp, c), extra_loss(pp, c)), p, q_chunks, g_q, nq, grads)
    grads, _ = gradcache.backprop_chunks(lambda pp, c, i: (encode(pp, c), 0.0, ()), p, d_chunks, g_d, nd, grads)
    return ctr + extra, grads

  loss, grads = cached(params)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for name in params:
    np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(want[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_embedding_pass_keeps_no_gradient(problem):
  params, queries, _ = problem
  grad = jax.grad(lambda p: jnp.sum(gradcache.embed_chunks(
      lambda c, i: encode(p, c), gradcache.split_chunks(queries, CHUNK), Q // CHUNK)))(params)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad))
