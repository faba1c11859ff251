"""Generation: KV-cache decoding against full re-forward, shape buckets, sampling against transformers' top-p."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from o1jax.generate import (TOP_P_CANDIDATES, Generator, Sampling, bucket, cache_slots, generate_padded, greedy_token,
                            length_bucket, penalize_repeats, top_p_filter)
from o1jax.model import Decoder, ModelConfig, decoding_layout, init_params

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, eos_token_id=3, pad_token_id=0)


def full_reforward_greedy(cfg, params, prompt, steps, eos, repetition_penalty=None):
  """Greedy decoding by re-running the whole sequence each step: the reference the cache must reproduce; with
  transformers' repetition-penalty processor over the sequence so far when one is given."""
  width = 32  # right-padded to one width so the reference compiles once
  forward = jax.jit(lambda ids, mask: Decoder(cfg).apply({"params": params}, ids, jnp.arange(width)[None], mask,
                                                         method=Decoder.forward_logits)[1])
  seq = list(prompt)
  for _ in range(steps):
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(seq)] = seq
    logits = np.asarray(forward(ids, (np.arange(width) < len(seq))[None].astype(np.int32))[0, len(seq) - 1])
    if repetition_penalty is not None:
      logits = RepetitionPenaltyLogitsProcessor(repetition_penalty)(torch.tensor([seq]), torch.tensor(logits[None]))
      logits = logits.numpy()[0]
    seq.append(int(logits.argmax()))
    if seq[-1] in eos:
      break
  return seq[len(prompt):]


@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 6)])
def test_cache_decoding_equals_full_reforward(family, window):
  cfg = ModelConfig(family=family, sliding_window=window, **TINY)
  params = init_params(cfg, jax.random.key(1))
  # Scale up the head so greedy paths are not dominated by near-ties of a random model.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
  prompts = [[5, 9, 17, 33, 2], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
  steps = 12  # with window 6, decoding runs past the window: the cache path must drop old slots
  eos = (96,)  # an id the model is unlikely to pick, so rows run long
  outs = Generator(cfg, params, eos_ids=eos).generate(prompts, max_new_tokens=steps)
  for prompt, out in zip(prompts, outs):
    assert out == full_reforward_greedy(cfg, params, prompt, steps, eos)


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False)])
def test_decoding_layout_is_the_same_model(family, tied):
  """Per-layer weights and an untied copy of a tied head (CPU decoding's layout) compute what the stacked
  parameters do: hidden states, logits, and (with remat) the gradients, mapped back through the layout."""
  cfg = ModelConfig(family=family, tie_word_embeddings=tied, attention_bias=family == "qwen2", remat_policy="full",
                    **TINY)
  params = init_params(cfg, jax.random.key(6))
  layout_cfg, layout_params = decoding_layout(cfg, params)
  assert not layout_cfg.scan_layers and not layout_cfg.tie_word_embeddings
  assert sorted(k for k in layout_params if k.startswith("layers_")) == ["layers_0", "layers_1"]
  ids = jnp.asarray([[5, 9, 17, 33, 2, 0], [7, 8, 0, 0, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(6), ids.shape)

  def forward(c, p):
    return Decoder(c).apply({"params": p}, ids, positions, mask, method=Decoder.forward_logits)

  for ours, theirs in zip(forward(cfg, params), forward(layout_cfg, layout_params)):
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-6)
  loss = lambda c: lambda p: jnp.sum(forward(c, p)[1][:, :, :8] ** 2)
  stacked = jax.grad(loss(cfg))(params)
  per_layer = jax.grad(loss(layout_cfg))(layout_params)
  for i in range(cfg.num_hidden_layers):
    jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(b, a[i], rtol=1e-5, atol=1e-6), stacked["layers"],
                 per_layer[f"layers_{i}"])


def test_stacked_cache_decoding_equals_cpu_layout():
  """The rolled layer loop over a stacked KV cache (how accelerators decode) and CPU's per-layer layout generate
  the same tokens."""
  cfg = ModelConfig(family="mistral", sliding_window=6, **TINY)
  params = init_params(cfg, jax.random.key(7))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
  generator = Generator(cfg, params, eos_ids=(96,), pad_id=0)
  assert not generator.decoding[0].scan_layers  # on this CPU
  prompts = [[5, 9, 17, 33, 2], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
  expected = generator.generate(prompts, max_new_tokens=10)
  ids = np.zeros((4, 16), np.int32)
  mask = np.zeros((4, 16), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, 16 - len(prompt):], mask[row, 16 - len(prompt):] = prompt, 1
  mask[3, -1] = 1
  tokens, lengths = generate_padded(params, ids, mask, jax.random.key(0), jnp.float32(1e-6), jnp.float32(1.0),
                                    jnp.float32(1.0), jnp.asarray([96], jnp.int32), jnp.int32(0), cfg=cfg,
                                    max_new_tokens=10, greedy=True, cache_growth=4)  # stacked caches grown too
  assert [np.asarray(tokens)[r, :np.asarray(lengths)[r]].tolist() for r in range(3)] == expected


def test_rows_stop_at_their_own_eos():
  cfg = ModelConfig(family="llama", **TINY)
  params = init_params(cfg, jax.random.key(2))
  prompts = [[5, 9, 17], [40, 41], [60]]
  free = Generator(cfg, params, eos_ids=(96,)).generate(prompts, max_new_tokens=8)
  # Make the third token of row 0 an EOS: row 0 stops there, the others are unchanged.
  eos = free[0][2]
  stopped = Generator(cfg, params, eos_ids=(eos,)).generate(prompts, max_new_tokens=8)
  assert stopped[0] == free[0][:3]
  for full, out in zip(free[1:], stopped[1:]):
    cut = full.index(eos) + 1 if eos in full else len(full)
    assert out == full[:cut]


def test_one_compile_per_bucket():
  cfg = ModelConfig(family="qwen2", attention_bias=True, **TINY)
  gen = Generator(cfg, init_params(cfg, jax.random.key(3)))
  before = generate_padded._cache_size()
  gen.generate([[1, 2, 3]], max_new_tokens=4)
  gen.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=4)  # same buckets: batch 1, length 16
  assert generate_padded._cache_size() == before + 1
  gen.generate([[1, 2, 3]] * 3, max_new_tokens=4)  # batch bucket 4: one more
  assert generate_padded._cache_size() == before + 2
  assert bucket(3) == 4 and bucket(9, 16) == 16 and bucket(17, 16) == 32
  lengths = (1, 16, 17, 24, 25, 38, 48, 49, 65, 97)
  assert [length_bucket(n) for n in lengths] == [16, 16, 24, 24, 32, 48, 48, 64, 96, 128]


def test_cache_slots_grow_to_the_prompt_and_every_token_fed_back():
  assert cache_slots(48, 128) == (80, 112, 144, 175)  # 127 fed back over four loops of 32
  assert cache_slots(48, 128, growth=0) == (175,)
  assert cache_slots(16, 10) == (25,) and cache_slots(5, 1) == (5,)  # short budgets: one loop
  assert cache_slots(16, 70, growth=32) == (48, 80, 85)


@pytest.mark.parametrize("sampled", [False, True])
def test_a_growing_cache_generates_what_one_cache_does(sampled):
  """Decoding in loops over a cache grown between them (across Mistral's window, with the repetition penalty's
  record of seen tokens, sampling keyed by the step) gives the tokens one loop over the whole cache gives."""
  cfg = ModelConfig(family="mistral", sliding_window=6, **TINY)
  params = init_params(cfg, jax.random.key(8))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
  prompts = [[5, 9, 17, 33, 2], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
  ids = np.zeros((4, 16), np.int32)
  mask = np.zeros((4, 16), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, 16 - len(prompt):], mask[row, 16 - len(prompt):] = prompt, 1
  mask[3, -1] = 1

  def generate(growth):
    tokens, lengths = generate_padded(params, ids, mask, jax.random.key(4), jnp.float32(0.8 if sampled else 1e-6),
                                      jnp.float32(0.9), jnp.float32(1.3), jnp.asarray([96], jnp.int32), jnp.int32(0),
                                      cfg=cfg, max_new_tokens=40, greedy=not sampled, penalize=True,
                                      cache_growth=growth)
    return np.asarray(tokens), np.asarray(lengths)

  whole = generate(0)
  assert (whole[1] > 30).any()  # rows run through several loops
  for growth in (8, 13, None):
    np.testing.assert_array_equal(generate(growth)[0], whole[0])
    np.testing.assert_array_equal(generate(growth)[1], whole[1])


def test_greedy_token_is_numpys_argmax():
  logits = np.random.default_rng(0).normal(size=(7, 1000)).astype(np.float32)
  logits[1, [10, 500]] = 9.0  # a tie: the first maximum wins
  logits[2, [700, 30]] = np.nan  # NaN counts as the maximum, the first one wins
  logits[3] = -np.inf
  logits[4, [999, 998]] = np.inf
  logits[5, 999] = 50.0  # the maximum at the last index
  logits[6] = 0.0
  expected = np.argmax(logits, axis=-1)
  assert expected.tolist()[1:] == [10, 30, 0, 998, 999, 0]
  np.testing.assert_array_equal(np.asarray(jax.jit(greedy_token)(logits)), expected)


def test_sampling_is_seeded_and_top_p_matches_transformers():
  cfg = ModelConfig(family="llama", **TINY)
  gen = Generator(cfg, init_params(cfg, jax.random.key(4)), eos_ids=(96,))
  prompts = [[5, 6, 7], [8, 9]]
  a = gen.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, rng=jax.random.key(7))
  b = gen.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, rng=jax.random.key(7))
  c = gen.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, rng=jax.random.key(8))
  assert a == b and a != c
  with pytest.raises(ValueError, match="PRNG key"):
    gen.generate(prompts, max_new_tokens=2, temperature=1.0)

  # The nucleus equals the tokens transformers' TopPLogitsWarper keeps. 50 tokens: the top_k candidates are the
  # whole vocabulary; 600 tokens at scale 1: the nucleus outgrows the candidates and the full sort decides;
  # 600 tokens at scale 6: the candidates decide.
  filter_jit = jax.jit(top_p_filter)
  nucleus_sizes = {}
  for vocab, scale, top_p in ((50, 3, 0.1), (50, 3, 0.5), (50, 3, 0.9), (600, 1, 0.9), (600, 6, 0.9),
                               (600, 6, 1.0), (600, 1, 1.0)):
    logits = np.random.default_rng(vocab * scale).normal(size=(4, vocab)).astype(np.float32) * scale
    kept_ref = np.isfinite(TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy())
    kept = np.isfinite(np.asarray(filter_jit(jnp.asarray(logits), top_p)))
    np.testing.assert_array_equal(kept, kept_ref, err_msg=f"vocab={vocab} scale={scale} top_p={top_p}")
    nucleus_sizes[vocab, scale, top_p] = kept_ref.sum(-1)
  assert (nucleus_sizes[600, 1, 0.9] > TOP_P_CANDIDATES).all() and (nucleus_sizes[600, 6, 0.9] < TOP_P_CANDIDATES).all()
  assert (nucleus_sizes[600, 1, 1.0] == 600).all()  # top_p=1 keeps the whole vocabulary


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1.0, r"temperature=-1.0: must be a finite number >= 0"),
    ("temperature", float("inf"), r"temperature=inf: must be a finite number >= 0"),
    ("temperature", float("nan"), r"temperature=nan: must be a finite number >= 0"),
    ("top_p", 2.0, r"top_p=2.0: must be in \(0, 1\]"),
    ("top_p", 0.0, r"top_p=0.0: must be in \(0, 1\]"),
    ("top_p", float("nan"), r"top_p=nan: must be in \(0, 1\]"),
    ("max_new_tokens", 0, r"max_new_tokens=0: must be an integer >= 1"),
    ("max_new_tokens", 2.5, r"max_new_tokens=2.5: must be an integer >= 1"),
    ("repetition_penalty", 0.0, r"repetition_penalty=0.0: must be a finite number > 0 \(1 = off\)"),
    ("repetition_penalty", float("nan"), r"repetition_penalty=nan: must be a finite number > 0"),
])
def test_sampling_rejects_settings_outside_their_range(field, value, message):
  with pytest.raises(ValueError, match=message):
    Sampling(**{field: value})
  # Generator.generate takes the same values bare and checks them the same way, before anything compiles.
  cfg = ModelConfig(family="llama", **TINY)
  gen = Generator(cfg, init_params(cfg, jax.random.key(5)))
  settings = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 2, field: value}
  before = generate_padded._cache_size()
  with pytest.raises(ValueError, match=message):
    gen.generate([[1, 2]], rng=jax.random.key(0), **settings)
  assert generate_padded._cache_size() == before


def test_sampling_accepts_the_edges():
  assert Sampling(temperature=0, top_p=1.0, max_new_tokens=np.int64(1)).temperature == 0  # greedy, no nucleus cut
  # transformers' warper accepts top_p=1 too and keeps everything; a tiny top_p keeps the single best token.
  logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
  kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), Sampling(top_p=1e-6).top_p)))
  np.testing.assert_array_equal(kept, np.isfinite(TopPLogitsWarper(1e-6)(None, torch.tensor(logits)).numpy()))
  assert (kept.sum(-1) == 1).all()


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers_processor(penalty):
  """The same logits as transformers' processor over the same previous ids (repeats and negatives included)."""
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(3, 40)).astype(np.float32) * 4
  previous = rng.integers(0, 40, size=(3, 12))
  want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(previous), torch.tensor(logits)).numpy()
  seen = np.zeros((3, 40), bool)
  np.put_along_axis(seen, previous, True, axis=1)
  np.testing.assert_allclose(np.asarray(penalize_repeats(jnp.asarray(logits), jnp.asarray(seen), penalty)), want,
                             rtol=1e-6)


def test_repetition_penalty_counts_prompt_and_thought_not_padding():
  """Greedy decoding with a penalty equals a re-forward that runs transformers' processor over each row's own ids,
  whatever the batch's left padding (pads are not counted; a real token equal to the pad id is); 1 changes nothing."""
  cfg = ModelConfig(family="llama", **TINY)
  params = init_params(cfg, jax.random.key(6))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
  prompts = [[5, 9, 17, 33, 2, 0, 0], [7], [11, 12, 13]]  # id 0 is the pad id: a real prompt token here
  gen = Generator(cfg, params, eos_ids=(96,))
  plain = gen.generate(prompts, max_new_tokens=10)
  penalized = gen.generate(prompts, max_new_tokens=10, repetition_penalty=4.0)
  for prompt, got in zip(prompts, penalized):
    assert got == full_reforward_greedy(cfg, params, prompt, 10, (96,), repetition_penalty=4.0)
  assert plain != penalized and gen.generate(prompts, max_new_tokens=10, repetition_penalty=1.0) == plain
  assert all(len(set(p + t)) < len(p + t) for p, t in zip(prompts, plain))  # the random model repeats itself
