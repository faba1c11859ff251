"""Batched generation for thoughts: one jitted prefill and KV-cache decoding loops.

Prompts are left-padded into shape buckets (batch rounded up to a power of two, prompt length to a power of two or
1.5 times one), so a new call compiles only when it lands in a new bucket. Output is token ids: callers append ids
(EOS, `<emb>`) and never decode and re-tokenize.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import Decoder, KVCache, ModelConfig, decoding_layout

MIN_PROMPT_BUCKET = 16
# Every decoding step reads every slot of the KV cache, filled or not (SmolLM2-135M at batch 8: ~0.04 ms a step per
# slot, a fifth of a step at 192 slots). So decoding runs as up to DECODE_LOOPS loops, each over a cache just large
# enough for the tokens it feeds back, grown between them: 128 new tokens after a 48-token prompt read 128 slots a
# step on average instead of 175.
DECODE_LOOPS = 4
MIN_CACHE_GROWTH = 32  # fewer, larger loops below this: each loop compiles the model's decoding step once more


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How thoughts are sampled at inference (METHOD §6 defaults); temperature 0 is greedy.

  Invalid settings raise ValueError at construction. Each message starts with the field's name (`top_p=2.0: ...`),
  which is also the name of the CLI option, so a CLI can name the option by prefixing `--`.
  """
  temperature: float = 0.1
  top_p: float = 0.9
  max_new_tokens: int = 128
  # transformers' `repetition_penalty` (CTRL's): logits of tokens already in the prompt or the thought are divided
  # by it (multiplied when negative); 1 = off. Small models fine-tuned briefly tend to loop in their thoughts.
  repetition_penalty: float = 1.0

  def __post_init__(self):
    # A negative temperature flips the distribution and top_p > 1 or <= 0 keeps every token or none: generation
    # would run and return plausible-looking thoughts from the wrong distribution, so refuse them here.
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = no nucleus cut)")
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral) \
        or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be an integer >= 1")
    if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
      raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be a finite number > 0 (1 = off)")


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return 1 << (max(n, minimum) - 1).bit_length()


def length_bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
  """The smallest power of two or 1.5 times one that is >= max(n, minimum): a prompt pads by at most a third, not
  (as with powers of two alone) nearly double, for at most twice as many shapes to compile."""
  power = bucket(n, minimum)
  three_quarters = power * 3 // 4
  return three_quarters if three_quarters >= max(n, minimum) else power


def cache_slots(prompt_len: int, max_new_tokens: int, growth: int | None = None) -> tuple[int, ...]:
  """The KV cache's size in each decoding loop: from the prompt plus `growth` slots, `growth` more each loop, to
  the prompt and every generated token fed back (all but the last). `growth` defaults to the new tokens over
  DECODE_LOOPS loops (a multiple of 8, at least MIN_CACHE_GROWTH); 0 is one loop over the whole cache."""
  total = prompt_len + max_new_tokens - 1
  if growth is None:
    growth = max(MIN_CACHE_GROWTH, -(-(max_new_tokens - 1) // (8 * DECODE_LOOPS)) * 8)
  if growth <= 0:
    return (total,)
  return tuple(range(prompt_len + growth, total, growth)) + (total,)


# Nucleus candidates taken with top_k before falling back to a full sort of the vocabulary.
TOP_P_CANDIDATES = 256


def _nucleus_threshold(sorted_logits, log_norm, top_p):
  """The smallest logit kept: a token stays when the mass strictly before it (in descending order) is below top_p.

  Returns the threshold [B, 1] and whether the given candidates hold enough mass to decide it."""
  probs = jnp.exp(sorted_logits - log_norm)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = before < top_p
  decided = jnp.all(before[..., -1:] + probs[..., -1:] >= top_p) | (sorted_logits.shape[-1] == 1)
  return jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True), decided


def top_p_filter(logits: jnp.ndarray, top_p) -> jnp.ndarray:
  """Logits outside the smallest set of most likely tokens with mass >= top_p set to -inf (transformers' rule).

  The nucleus is found among the TOP_P_CANDIDATES most likely tokens (a top_k, cheap) and only when those do not
  hold top_p of the mass, by sorting the whole vocabulary (a sort per decode step dominates small models on CPU).
  """
  def nucleus():
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    candidates = jax.lax.top_k(logits, min(TOP_P_CANDIDATES, logits.shape[-1]))[0]
    threshold, decided = _nucleus_threshold(candidates, log_norm, top_p)
    threshold = jax.lax.cond(
        decided, lambda: threshold,
        lambda: _nucleus_threshold(jnp.sort(logits, axis=-1)[..., ::-1], log_norm, top_p)[0])
    return jnp.where(logits >= threshold, logits, -jnp.inf)

  # top_p >= 1 keeps every token (transformers skips the warper). Without this branch no candidate set ever
  # reaches a mass of exactly 1 in float32, so every step would sort the vocabulary and then still cut its tail.
  return jax.lax.cond(top_p >= 1, lambda: logits, nucleus)


def penalize_repeats(logits: jnp.ndarray, seen: jnp.ndarray, penalty) -> jnp.ndarray:
  """transformers' RepetitionPenaltyLogitsProcessor: logits of `seen` tokens [B, V] divided by `penalty` where
  positive and multiplied where negative, so a penalty > 1 always makes them less likely."""
  penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalized, logits)


def greedy_token(logits: jnp.ndarray) -> jnp.ndarray:
  """`jnp.argmax(logits, axis=-1)` (the first maximum; a NaN counts as the maximum) as two plain reductions:
  XLA:CPU runs argmax's paired value-and-index reduction 4x slower (0.9 vs 0.2 ms a step over 8 x 49k logits)."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where((logits == top) | jnp.isnan(logits), ids, logits.shape[-1]), axis=-1)


def sample_token(logits: jnp.ndarray, key: jax.Array, temperature, top_p) -> jnp.ndarray:
  """Samples from softmax(logits / temperature) restricted to the top_p nucleus."""
  filtered = top_p_filter(logits.astype(jnp.float32) / temperature, top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "penalize", "cache_growth"))
def generate_padded(params, prompt_ids, prompt_mask, rng, temperature, top_p, repetition_penalty, eos_ids, pad_id, *,
                    cfg: ModelConfig, max_new_tokens: int, greedy: bool, penalize: bool = False,
                    cache_growth: int | None = None):
  """Generates from left-padded prompts [B, P]; `penalize` applies `repetition_penalty` to every token of a row's
  prompt (its padding excluded) and of what it generated so far; `cache_growth` as for `cache_slots`.

  Returns tokens [B, max_new_tokens] (pad after a row's EOS) and lengths [B] (new tokens up to and including EOS).
  """
  model = Decoder(cfg)
  batch, prompt_len = prompt_ids.shape
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  slots = cache_slots(prompt_len, max_new_tokens, cache_growth)
  cache = KVCache.empty(cfg, batch, slots[0])
  hidden, cache = model.apply({"params": params}, prompt_ids, positions, prompt_mask, cache)
  rows = jnp.arange(batch)
  # Which vocabulary entries each row has seen ([B, V] bools): None when there is no penalty to apply.
  seen = jnp.zeros((batch, cfg.vocab_size), bool).at[rows[:, None], prompt_ids].max(prompt_mask > 0) \
      if penalize else None

  def next_token(hidden_last, step, seen):
    logits = model.apply({"params": params}, hidden_last, method=Decoder.logits)
    if penalize:
      logits = penalize_repeats(logits, seen, repetition_penalty)
    if greedy:
      token = greedy_token(logits)
    else:
      token = sample_token(logits, jax.random.fold_in(rng, step), temperature, top_p)
    return token, (seen.at[rows, token].set(True) if penalize else None)

  first, seen = next_token(hidden[:, -1], 0, seen)
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos_ids)
  lengths = jnp.ones((batch,), jnp.int32)
  state = (jnp.int32(1), first, positions[:, -1] + 1, done, tokens, lengths, cache, seen)

  def cond(last_step, state):
    step, _, _, done, *_ = state
    return (step <= last_step) & ~jnp.all(done)

  def body(state):
    step, token, position, done, tokens, lengths, cache, seen = state
    hidden, cache = model.apply({"params": params}, token[:, None], position[:, None],
                                jnp.ones((batch, 1), jnp.int32), cache)
    token, seen = next_token(hidden[:, -1], step, seen)
    token = jnp.where(done, pad_id, token)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos_ids)
    return step + 1, token, position + 1, done, tokens, lengths, cache, seen

  for size in slots:
    state = (*state[:6], state[6].grown(size), state[7])
    # Step s feeds the token it follows into slot prompt_len + s - 1.
    last_step = min(size - prompt_len, max_new_tokens - 1)
    state = jax.lax.while_loop(functools.partial(cond, last_step), body, state)
  tokens, lengths = state[4:6]
  return tokens, lengths


def _platform(params) -> str:
  leaf = jax.tree.leaves(params)[0]
  devices = leaf.devices() if isinstance(leaf, jax.Array) else jax.devices()
  return next(iter(devices)).platform


class Generator:
  """Generates continuations of token-id prompts with a fixed model.

  eos_ids defaults to the model's EOS ids; chat experts usually add their end-of-turn token.
  """

  def __init__(self, cfg: ModelConfig, params, *, eos_ids: Sequence[int] | None = None, pad_id: int | None = None):
    self.cfg, self.params = dataclasses.replace(cfg, unroll_layers=False), params
    self.eos_ids = tuple(eos_ids) if eos_ids is not None else cfg.eos_token_ids
    if not self.eos_ids:
      raise ValueError("no EOS token id: the model config has none and eos_ids was not given")
    self.pad_id = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                     else self.eos_ids[0])

  @functools.cached_property
  def decoding(self) -> tuple[ModelConfig, Any]:
    """The config and parameters the decoding loop runs, laid out at the first call.

    Decoding reads every weight once per token. On a CPU, XLA copies each layer's weights out of the stacked
    parameters before its matmuls, so there each layer gets its own weights and cache buffers (`decoding_layout`:
    one copy of the weights, not made for a generator that never runs; SmolLM2 at batch 8: 64 -> 50 ms per
    token step). Elsewhere the rolled layer loop reads the stacked parameters and updates the stacked cache in place.
    """
    if _platform(self.params) == "cpu":
      return decoding_layout(self.cfg, self.params)
    return self.cfg, self.params

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, rng: jax.Array | None = None, repetition_penalty: float = 1.0
               ) -> list[list[int]]:
    """New token ids for each prompt, ending with EOS when one was produced. temperature 0 is greedy."""
    if not prompts:
      return []
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    Sampling(temperature, top_p, max_new_tokens, repetition_penalty)  # the same checks for callers that pass bare values
    greedy = temperature == 0.0
    if not greedy and rng is None:
      raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: rng=jax.random.key(seed)")
    batch, length = bucket(len(prompts)), length_bucket(max(len(p) for p in prompts))
    ids = np.full((batch, length), self.pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
      ids[row, length - len(prompt):] = prompt
      mask[row, length - len(prompt):] = 1
    mask[len(prompts):, -1] = 1  # filler rows: one token, so they stay well defined
    cfg, params = self.decoding
    tokens, lengths = generate_padded(
        params, ids, mask, rng if rng is not None else jax.random.key(0), jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p), jnp.float32(repetition_penalty), jnp.asarray(self.eos_ids, jnp.int32),
        jnp.int32(self.pad_id), cfg=cfg, max_new_tokens=max_new_tokens, greedy=greedy,
        penalize=repetition_penalty != 1.0)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [tokens[row, :lengths[row]].tolist() for row in range(len(prompts))]
