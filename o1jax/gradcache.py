"""GradCache: the contrastive loss over a batch larger than one forward pass can hold, with exact gradients.

  1. embed every chunk of queries and passages without keeping activations (no gradients);
  2. on the full set of embeddings, take the loss and its gradient with respect to the embeddings;
  3. re-run each chunk with gradients and back-propagate the cached embedding gradients through it
     (the surrogate sum(emb * cached_grad) has exactly the chunk's share of the parameter gradient).

The query re-run in step 3 also computes the behavior-cloning term of its chunk, so L_gen still comes from the
same forward pass as the query embedding. Chunks are strided (chunk j holds rows j, j + n, j + 2n, ...) so that
every chunk spans every device of a batch-sharded array.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def split_chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """[N, ...] -> [N / chunk, chunk, ...]; chunk j holds rows j, j + n, ... (n = N / chunk)."""
  if x.shape[0] % chunk:
    raise ValueError(f"gradcache_chunk={chunk} does not divide the {x.shape[0]} rows of a (micro-)batch")
  n = x.shape[0] // chunk
  return jnp.swapaxes(x.reshape((chunk, n) + x.shape[1:]), 0, 1)


def join_chunks(x: jnp.ndarray) -> jnp.ndarray:
  """Inverse of `split_chunks`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def embed_chunks(embed: Callable[[Any, int], jnp.ndarray], chunks: Any, num_chunks: int) -> jnp.ndarray:
  """Step 1: `embed(chunk_tree, chunk_index)` over all chunks, one at a time, without gradients."""
  def body(_, xs):
    chunk, index = xs
    return None, jax.lax.stop_gradient(embed(chunk, index))
  _, embs = jax.lax.scan(body, None, (chunks, jnp.arange(num_chunks)))
  return join_chunks(embs)


def backprop_chunks(terms: Callable[[Any, Any, int], tuple[jnp.ndarray, jnp.ndarray, Any]], params: Any,
                    chunks: Any, emb_grads: jnp.ndarray, num_chunks: int, grads: Any) -> tuple[Any, Any]:
  """Step 3: adds each chunk's parameter gradient to `grads`.

  `terms(params, chunk_tree, chunk_index)` returns (embeddings [chunk, D], an extra objective of the chunk
  whose gradient is added as is (e.g. its L_gen share), aux pytree). Returns (grads, aux summed over chunks).
  """
  cached = split_chunks(emb_grads, emb_grads.shape[0] // num_chunks)

  def surrogate(p, chunk, index, g):
    emb, extra, aux = terms(p, chunk, index)
    return jnp.sum(emb * g) + extra, aux

  def body(carry, xs):
    acc, aux_sum = carry
    chunk, index, g = xs
    (_, aux), grad = jax.value_and_grad(surrogate, has_aux=True)(params, chunk, index, g)
    return (jax.tree.map(jnp.add, acc, grad), jax.tree.map(jnp.add, aux_sum, aux)), None

  aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda: terms(params, jax.tree.map(lambda c: c[0], chunks), 0)[2]))
  (grads, aux), _ = jax.lax.scan(body, (grads, aux0), (chunks, jnp.arange(num_chunks), cached))
  return grads, aux
