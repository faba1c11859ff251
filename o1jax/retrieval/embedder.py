"""Embeds token-id sequences with an o1jax model: length buckets, batch-sharded jitted forward, `<emb>` pooling.

Sequences are sorted by length and grouped into power-of-two widths, cut into batches of at most
`tokens_per_batch // width` rows; a batch's rows are padded to a power of two times the batch shards, so padding
stays below half of each row, a large corpus compiles about one program per width, and a few queries do not run
a corpus-sized batch. The vector of a sequence is the L2-normalised final hidden
state at its last token (`<emb>` in every o1jax template), as in training (`o1jax.model.pooling.pool_last`).
"""
from __future__ import annotations

from collections.abc import Sequence
import functools
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
import tqdm

from o1jax import sharding
from o1jax.generate import bucket
from o1jax.model import Decoder, ModelConfig, logical_axes, pooling

MIN_WIDTH = 16
# All devices on the fsdp axis: batch rows split over every device, parameters sharded at rest (as in training).
INFERENCE_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed_rows(params: Any, ids: jax.Array, mask: jax.Array, *, cfg: ModelConfig) -> jax.Array:
  hidden = Decoder(cfg).apply({"params": params}, ids, pooling.positions(mask), mask)
  return pooling.pool_last(hidden, mask)


class SequenceEmbedder:
  """`embed(sequences)` → float32 [N, D] unit vectors; parameters placed on `mesh` (default: all devices).

  A caller that runs the model on `params` itself does so under `sharding.activation_rules(mesh)`, as `embed`
  does: the model constrains its activations by logical axis names while tracing.
  """

  def __init__(self, cfg: ModelConfig, params: Any, mesh: Mesh | None = None, tokens_per_batch: int = 16384):
    self.cfg = cfg
    self.mesh = mesh if mesh is not None else sharding.make_mesh(INFERENCE_MESH)
    self.shards = sharding.batch_shards(self.mesh)
    self.tokens_per_batch = tokens_per_batch
    param_shardings = sharding.logical_to_shardings(logical_axes(cfg), params, self.mesh)
    self.params = jax.device_put(params, param_shardings)
    self._batch_sharding = sharding.batch_sharding(self.mesh)

  def max_rows(self, width: int) -> int:
    """Rows of a full batch of `width`: about `tokens_per_batch` tokens, a multiple of the shards."""
    return max(self.shards, self.tokens_per_batch // width // self.shards * self.shards)

  def padded_rows(self, rows: int, width: int) -> int:
    """`rows` rounded up to a power of two of shard groups, capped at `max_rows` (few distinct shapes)."""
    return min(self.max_rows(width), bucket(-(-rows // self.shards)) * self.shards)

  def batches(self, lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(width, row indices) per batch: indices sorted by length, cut into width buckets of `max_rows` rows."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out: list[tuple[int, list[int]]] = []
    for i in order:
      width = bucket(lengths[i], MIN_WIDTH)
      if not out or out[-1][0] != width or len(out[-1][1]) == self.max_rows(width):
        out.append((width, []))
      out[-1][1].append(i)
    return out

  def embed(self, sequences: Sequence[Sequence[int]], desc: str | None = None) -> np.ndarray:
    """Unit vectors of `sequences`; with `desc`, a progress bar of that name on stderr."""
    for i, seq in enumerate(sequences):
      if not len(seq):
        raise ValueError(f"sequence {i} is empty")
    out = np.zeros((len(sequences), self.cfg.hidden_size), np.float32)
    progress = tqdm.tqdm(total=len(sequences), desc=desc, unit="seq", disable=desc is None, file=sys.stderr)
    for width, indices in self.batches([len(s) for s in sequences]):
      rows = self.padded_rows(len(indices), width)
      ids = np.zeros((rows, width), np.int32)
      mask = np.zeros((rows, width), np.int32)
      mask[len(indices):, 0] = 1  # filler rows: one token keeps their (discarded) pooling index in range
      for row, i in enumerate(indices):
        ids[row, :len(sequences[i])] = sequences[i]
        mask[row, :len(sequences[i])] = 1
      with sharding.activation_rules(self.mesh):
        placed = jax.device_put((ids, mask), self._batch_sharding)
        vectors = embed_rows(self.params, *placed, cfg=self.cfg)
      out[indices] = np.asarray(vectors)[:len(indices)]
      progress.update(len(indices))
    progress.close()
    return out
