"""Which parameters train: per leaf, all of its gradient, only the special-token rows, or none.

Trainable parameters are selected per leaf of the tree {'params': model parameters, ('lora': adapters)}.
Frozen leaves get no gradient computation, no optimizer state and are returned untouched (bit-identical). The
four special-token rows of the embeddings can train while the rest of the vocabulary stays frozen (their
gradient is masked to those rows).
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from o1jax import lora
from o1jax.tokenizer import SpecialIds

# Embedding leaves: module -> (leaf name, vocabulary axis).
EMBEDDINGS = {"embed_tokens": ("embedding", 0), "lm_head": ("kernel", 1)}
# How the gradient of a leaf is used: all of it, only the special-token rows, or none (frozen).
FULL, ROWS, FROZEN = "full", "rows", "frozen"
TRAINABLE_KEYS = ("params", "lora")


@dataclasses.dataclass(frozen=True)
class Selection:
  """What fine-tuning trains: the whole body (lora None) or LoRA adapters on a frozen body; the embeddings
  entirely, their special-token rows, or nothing."""
  lora: lora.LoraConfig | None = None
  train_embeddings: bool = False
  train_special_tokens: bool = True


def grad_use(selection: Selection, abstract_params: Any) -> dict:
  """FULL / ROWS / FROZEN per leaf of the trainable tree {'params': ..., ('lora': ...)}."""
  if selection.train_embeddings:
    embedding_use = FULL
  else:
    embedding_use = ROWS if selection.train_special_tokens else FROZEN
  body_use = FULL if selection.lora is None else FROZEN

  def use(path, _):
    return embedding_use if str(path[0].key) in EMBEDDINGS else body_use

  tree = {"params": jax.tree_util.tree_map_with_path(use, abstract_params)}
  if selection.lora is not None:
    adapters = jax.eval_shape(lambda: lora.init(abstract_params, selection.lora, jax.random.key(0)))
    tree["lora"] = jax.tree.map(lambda _: FULL, adapters)
  return tree


def trainable_part(state: Mapping[str, Any]) -> dict:
  """The parameters (and adapters) of a train state, without optimizer state, step or PRNG."""
  return {k: state[k] for k in TRAINABLE_KEYS if k in state}


def split(use: dict, trainable: dict) -> tuple[dict, dict]:
  """(trainable leaves, frozen leaves), each with None in the other's places."""
  train = jax.tree.map(lambda u, x: None if u == FROZEN else x, use, trainable)
  frozen = jax.tree.map(lambda u, x: x if u == FROZEN else None, use, trainable)
  return train, frozen


def combine(train_part: Any, frozen_part: Any) -> Any:
  """Leaf-wise union of two trees that hold None where the other holds the leaf."""
  return jax.tree.map(lambda t, f: f if t is None else t, train_part, frozen_part, is_leaf=lambda x: x is None)


def mask_rows(use: dict, grads: Any, special: SpecialIds) -> Any:
  """Zeroes the gradient of every vocabulary row but the special tokens' on ROWS leaves."""
  rows = [special.query, special.query_end, special.thought, special.emb]

  def mask(path, leaf_use, g):
    if leaf_use != ROWS:
      return g
    axis = EMBEDDINGS[str(path[1].key)][1]
    keep = jnp.zeros((g.shape[axis],), g.dtype).at[jnp.asarray(rows)].set(1)
    return g * (keep[:, None] if axis == 0 else keep[None, :])

  return jax.tree_util.tree_map_with_path(mask, use, grads, is_leaf=lambda x: x is None)


def head_trained(use: dict) -> bool:
  """Whether any part of the (tied or untied) LM head's weight gets a gradient."""
  return jax.tree.leaves(use["params"]["embed_tokens"])[0] != FROZEN
