"""Knowledge distillation end to end: teacher scores travel from shards through the pipeline and the batcher into
the step, the loss's gradient is a hand-written KL's (PyTorch), and training on it moves the student's group
distribution to the teacher's.

The teacher here prefers each query's LAST hard negative over its positive, the opposite of what the contrastive
labels say, so a student that ends up ranking that negative first has learned it from the teacher and nowhere else.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import tqdm
import transformers

from data_tools import shards
from data_tools.record import ThoughtRecord, read_shard
from o1jax import losses, templates
from o1jax.data import batching, pipeline
from o1jax.tokenizer import SpecialIds
from o1jax.training import objective
from o1jax.training.trainer import Trainer
from test_train_step import SPECIAL, TINY, make_batch, make_mesh, make_settings

G = 4
WORD_SPECIAL = SpecialIds(query=50, query_end=51, thought=52, emb=53, eos=54, bos=55, pad=56)


def _record(i: int) -> ThoughtRecord:
  negatives = tuple(f"negative {n} of query {i}" for n in range(5))
  return ThoughtRecord(
      query_id=f"q{i}", query=f"query {i}", thoughts=(f"thought {i}",), chosen=0,
      positives=(f"positive of query {i}",), negatives=negatives, positive_ids=(f"p{i}",),
      negative_ids=tuple(f"n{i}-{n}" for n in range(5)), committee_members=("bm25",),
      committee_weights=np.ones(1, np.float32), committee_scores=np.zeros((1, 1), np.float32), vote="soft",
      vote_totals=np.ones(1, np.float32), positive_scores=np.array([10.0 + i], np.float32),
      negative_scores=np.arange(5, dtype=np.float32) + 20.0 + i, teacher="hand-made", miner="given")


def _write(out, records):
  with tqdm.tqdm(disable=True) as progress:
    for s in range(2):
      shards.write_shard(out / shards.shard_name("train", s, 2), s, records[s::2], lambda chunk, bad: chunk, 4,
                         progress)
  return shards.write_manifest(out, "train", 2, {"test": "distillation"})


@pytest.fixture(scope="module")
def tokenizer():
  # A word-level tokenizer over the records' words: the batcher needs real token ids, not a model's vocabulary.
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = ["query", "thought", "positive", "negative", "of"] + [str(n) for n in range(40)]
  vocab = {"[UNK]": 0, **{w: n + 1 for n, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def _spec(**kw):
  return batching.BatchSpec(batch_queries=4, group_size=G, lengths=templates.Lengths(query=8, query_thought=20, doc=12),
                            thought_drop=0.0, **kw)


def test_teacher_scores_travel_from_shards_to_batches(tmp_path, tokenizer):
  records = [_record(i) for i in range(8)]
  manifest = _write(tmp_path, records)
  assert manifest["num_records"] == 8
  by_id = {r.query_id: r for s in range(2) for r in read_shard(tmp_path / shards.shard_name("train", s, 2))}
  for r in records:
    got = by_id[r.query_id]
    np.testing.assert_array_equal(got.positive_scores, r.positive_scores)
    np.testing.assert_array_equal(got.negative_scores, r.negative_scores)
    assert (got.teacher, got.miner) == ("hand-made", "given")
  with pipeline.open_source([tmp_path / "manifest.json"]) as source:
    batch = batching.Batcher(source, tokenizer, WORD_SPECIAL, _spec(teacher_scores=True)).batch(0)
  score_of = {}
  for r in records:
    for text, score in zip(r.positives + r.negatives, np.concatenate([r.positive_scores, r.negative_scores])):
      score_of[tuple(tokenizer(text, add_special_tokens=False)["input_ids"])] = score
  for row, (ids, mask) in enumerate(zip(batch["doc_ids"], batch["doc_mask"])):
    tokens = tuple(int(t) for t in ids[mask == 1][1:-1])  # [BOS] text <emb>
    assert batch["teacher_scores"][row // G, row % G] == score_of[tokens], row


def test_distilling_unscored_records_is_named_before_compiling(tmp_path, tokenizer):
  records = [_record(i) for i in range(8)]
  unscored = [ThoughtRecord(**{**r.__dict__, "positive_scores": np.zeros(0, np.float32),
                               "negative_scores": np.zeros(0, np.float32), "teacher": ""}) for r in records]
  _write(tmp_path, unscored)
  with pipeline.open_source([tmp_path / "manifest.json"]) as source:
    with pytest.raises(batching.RecordError, match=r"config.train.w_distill > 0 needs teacher scores"):
      batching.Batcher(source, tokenizer, WORD_SPECIAL, _spec(teacher_scores=True))
    batching.Batcher(source, tokenizer, WORD_SPECIAL, _spec())  # without distillation they train as before


def test_distillation_gradient_is_a_hand_written_kl():
  rs = np.random.RandomState(0)
  q_emb, d_emb = rs.randn(3, 8).astype(np.float32), rs.randn(3 * G, 8).astype(np.float32)
  teacher, tau = rs.randn(3, G).astype(np.float32) * 3, 0.05

  def ours(q, d):
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # what pooling hands the losses
    scores = losses.contrastive(unit(q), unit(d), G, tau).scores
    return losses.distillation(scores, jnp.asarray(teacher), G, tau)

  value, (g_q, g_d) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(q_emb), jnp.asarray(d_emb))

  q, d = torch.tensor(q_emb, dtype=torch.float64, requires_grad=True), torch.tensor(d_emb, dtype=torch.float64,
                                                                                 requires_grad=True)
  qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
  own = torch.einsum("qd,qgd->qg", qn, dn.view(3, G, -1)) / tau
  p_teacher = torch.softmax(torch.tensor(teacher, dtype=torch.float64), dim=-1)
  kl = (p_teacher * (p_teacher.log() - torch.log_softmax(own, dim=-1))).sum(-1).mean()
  kl.backward()
  np.testing.assert_allclose(float(value), kl.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_q), q.grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_d), d.grad.numpy(), rtol=1e-4, atol=1e-6)


def _student_groups(trainer, state, batch):
  """Each query's softmax over its own group under the current parameters (the distribution distillation fits)."""
  trainable = {"params": state["params"]}
  forward = objective.Forward(TINY)
  q_emb, _ = forward.query_terms(trainable, batch, jax.random.key(0), with_lm=False)
  d_emb = forward.doc_embed(trainable, batch, jax.random.key(1))
  scores = losses.contrastive(q_emb, d_emb, batch["teacher_scores"].shape[1], trainer.settings.objective.tau).scores
  q, g = batch["teacher_scores"].shape
  own = np.asarray(scores).reshape(q, q, g)[np.arange(q), np.arange(q)]
  return jax.nn.softmax(own / trainer.settings.objective.tau, axis=-1)


def test_distillation_moves_the_student_to_the_teacher():
  batch = make_batch()
  q, g = batch["teacher_scores"].shape
  teacher = np.zeros((q, g), np.float32)
  teacher[:, -1] = 4.0  # the last negative over the positive, against the contrastive labels
  batch["teacher_scores"] = teacher
  trainer = Trainer(TINY, make_settings(w_ctr=0.0, w_gen=0.0, w_distill=1.0, steps=40), make_mesh(1, 1, 1), SPECIAL)
  state = trainer.init_state(jax.random.key(0))
  before = np.asarray(_student_groups(trainer, state, batch))
  sharded = trainer.shard_batch(batch)
  history = []
  for _ in range(40):
    state, metrics = trainer.step(state, sharded)
    history.append(float(metrics["loss_distill"]))
  after = np.asarray(_student_groups(trainer, state, batch))
  p_teacher = np.asarray(jax.nn.softmax(teacher, axis=-1))

  def kl(p):
    return float(np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p)), axis=-1)))

  np.testing.assert_allclose(history[0], kl(before), rtol=1e-4)  # the logged loss is this KL
  assert kl(after) < 0.2 * kl(before), (kl(before), kl(after))
  assert np.mean(np.argmax(after, axis=-1) == g - 1) >= 0.9
  assert np.mean(np.argmax(before, axis=-1) == g - 1) < 0.9
