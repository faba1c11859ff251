"""Export of a trained retriever: a LoRA run of tiny_cpu is exported with `o1jax.export`, loaded back with
transformers (`AutoModelForCausalLM` + `AutoTokenizer`), and transformers — driven by the model card's own code —
computes the same query and document embeddings as o1jax's embedder on the restored training state (<= 1e-4, fp32)
and generates the same greedy thoughts as `o1jax.generate.Generator`.
"""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from o1jax import checkpoint, config as o1config, export, sharding, templates, train
from o1jax.data import synthetic
from o1jax.export import model_card
from o1jax.export.__main__ import main as export_main
from o1jax.generate import Generator
from o1jax.retrieval import loading
from o1jax.retrieval.embedder import SequenceEmbedder
from o1jax.tokenizer import SPECIAL_TOKENS, SpecialIds
from o1jax.training.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, EVERY = 40, 20
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny_cpu LoRA run (8 devices, data parallel) checkpointed at steps 20 and 40."""
  out = tmp_path_factory.mktemp("run") / "ckpt"
  train.main([f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", f"--config.train.steps={STEPS}",
              "--config.train.finetune=lora", "--config.train.lora.rank=4", "--config.train.lora.alpha=8.0",
              # LoRA matrices of a 64-wide model cannot be sharded usefully: data parallel keeps them replicated.
              "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.log.tensorboard_dir=",
              f"--config.log.every={STEPS}", f"--config.checkpoint.dir={out}", f"--config.checkpoint.every={EVERY}"])
  return out


@pytest.fixture(scope="module")
def training(ckpt_dir):
  """(Trainer, restored training state on the 8-device mesh, run tokenizer) at the last step: o1jax's own view."""
  config, model_cfg, tokenizer = checkpoint.load_run_files(str(ckpt_dir))
  trainer = Trainer(model_cfg, o1config.trainer_settings(config), sharding.make_mesh(config.mesh),
                    SpecialIds.from_tokenizer(tokenizer))
  ckpt = checkpoint.Checkpointer(str(ckpt_dir), EVERY, 2)
  try:
    state, _ = ckpt.restore(STEPS, trainer.abstract_state_with_shardings())
  finally:
    ckpt.close()
  return trainer, state, tokenizer


@pytest.fixture(scope="module")
def hf_dir(ckpt_dir) -> pathlib.Path:
  return export.export(ckpt_dir, ckpt_dir.parent / "hf")


@pytest.fixture(scope="module")
def card(hf_dir) -> dict:
  """The namespace of the model card's Python snippet, run against the exported directory."""
  readme = (hf_dir / "README.md").read_text()
  code = readme.split("```python\n", 1)[1].split("```", 1)[0]
  assert code == model_card.snippet(hf_dir.name, export.Thinking().num_thoughts)
  namespace: dict = {}
  torch.manual_seed(0)
  exec(compile(model_card.snippet(str(hf_dir), 3), "README.md", "exec"), namespace)  # noqa: S102
  return namespace


def records(n: int) -> list[dict]:
  return synthetic.make_records(synthetic.SyntheticSpec())[::7][:n]


def test_training_left_nonzero_lora_b_so_the_merge_matters(training, ckpt_dir):
  _, state, _ = training
  leaves = jax.tree_util.tree_flatten_with_path(state["lora"])[0]
  b = {jax.tree_util.keystr(path): np.abs(np.asarray(x)).max() for path, x in leaves if "lora_b" in str(path)}
  assert len(b) == 7 and min(b.values()) > 0, b
  _, merged, _ = loading.load_checkpoint_for_inference(ckpt_dir)
  base = np.asarray(state["params"]["layers"]["mlp"]["down_proj"]["kernel"])
  assert np.abs(merged["layers"]["mlp"]["down_proj"]["kernel"] - base).max() > 100 * ATOL


def test_export_dir_has_tokenizer_config_generation_config_and_card(hf_dir, training):
  _, _, run_tokenizer = training
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
  assert ids == run_tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) and len(set(ids)) == 4
  assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
  text = "t1 c3 v2"
  assert tok(text)["input_ids"] == run_tokenizer(text)["input_ids"]
  hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
  assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (
      tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
  gen = transformers.GenerationConfig.from_pretrained(hf_dir)
  assert (gen.do_sample, gen.temperature, gen.top_p, gen.max_new_tokens, gen.eos_token_id) == (
      True, 0.1, 0.9, 128, tok.eos_token_id)
  readme = (hf_dir / "README.md").read_text()
  for fact in ("<query> q </query> <thought>", "k = 3", "temperature 0.1", "top-p 0.9", "128 new tokens",
               "after the final norm", "L2-normalized", "title text <emb>", "library_name: transformers"):
    assert fact in readme, fact
  assert not list(hf_dir.parent.glob(".hf.*")), "staging directories left behind"


def test_transformers_last_hidden_state_is_after_the_final_norm(card):
  model = card["model"]
  captured = {}
  hook = model.model.layers[-1].register_forward_hook(
      lambda module, args, out: captured.update(out=out[0] if isinstance(out, tuple) else out))
  try:
    ids = torch.tensor([[2, 5, 79, 206, 9]])
    with torch.no_grad():
      out = model(ids, output_hidden_states=True)
      normed = model.model.norm(captured["out"])
  finally:
    hook.remove()
  torch.testing.assert_close(out.hidden_states[-1], normed, rtol=0, atol=0)
  assert not torch.allclose(captured["out"], normed, atol=1e-3)


def test_transformers_embeddings_equal_o1jax(card, training):
  trainer, state, tok = training
  special = SpecialIds.from_tokenizer(tok)
  lengths = templates.Lengths()
  words = lambda text: tok(text, add_special_tokens=False)["input_ids"]
  sequences = []
  for r in records(6):
    assert card["query_prefix"](r["query"]) == templates.query_prefix(words(r["query"]), special, lengths)
    for thought in (words(r["thought"]), []):
      seq, _ = templates.query_sequence(words(r["query"]), thought, special, lengths)
      if thought:
        assert seq == card["query_sequence"](card["query_prefix"](r["query"]), thought)
      sequences.append(seq)
    doc = templates.document_sequence(words(r["positives"][0]), special, 512)
    sequences.append(doc)
  embedder = SequenceEmbedder(trainer.model_cfg, jax.device_get(trainer.inference_params(state)), trainer.mesh)
  ours = embedder.embed(sequences)
  theirs = np.stack([card["embed"](seq).numpy() for seq in sequences])
  np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=ATOL)
  first_doc = records(1)[0]["positives"][0]
  np.testing.assert_allclose(card["embed_document"]("", first_doc).numpy(), ours[2], rtol=0, atol=ATOL)


def test_greedy_thoughts_equal_o1jax_generator(card, ckpt_dir, training):
  _, _, tok = training
  cfg, params, _ = loading.load_checkpoint_for_inference(ckpt_dir)
  prompts = [card["query_prefix"](r["query"]) for r in records(4)]
  ours = Generator(cfg, params).generate(prompts, max_new_tokens=12)
  model = card["model"]
  for prompt, thought in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=12)
    assert out[0, len(prompt):].tolist() == thought
  assert all(thought for thought in ours)


def test_card_samples_k_thoughts_and_averages(card, hf_dir):
  thoughts = card["think"](card["query_prefix"](records(1)[0]["query"]))
  assert len(thoughts) == 3 and all(len(t) <= 128 for t in thoughts)
  vector = card["embed_query"](records(1)[0]["query"])
  assert vector.shape == (transformers.AutoConfig.from_pretrained(hf_dir).hidden_size,)
  assert 0.5 < float(vector.norm()) <= 1.0 + 1e-6


def test_step_flag_exports_that_step_and_existing_out_is_refused(ckpt_dir, hf_dir, tmp_path):
  cfg20, params20, _ = loading.load_checkpoint_for_inference(ckpt_dir, step=EVERY)
  _, params40, _ = loading.load_checkpoint_for_inference(ckpt_dir)
  assert not np.array_equal(params20["layers"]["self_attn"]["q_proj"]["kernel"],
                            params40["layers"]["self_attn"]["q_proj"]["kernel"])
  export_main([f"--checkpoint={ckpt_dir}", f"--out={tmp_path / 'hf20'}", f"--step={EVERY}", "--dtype=bfloat16"])
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf20")
  assert model.dtype == torch.bfloat16
  q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy()
  np.testing.assert_allclose(q, params20["layers"]["self_attn"]["q_proj"]["kernel"][0].T, atol=1e-2)
  with pytest.raises(FileExistsError, match="exists"):
    export.export(ckpt_dir, hf_dir)
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7; saved steps: \\[20, 40\\]"):
    loading.load_checkpoint_for_inference(ckpt_dir, step=7)


def test_cli_names_a_directory_that_is_no_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "o1jax.export", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'o'}"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert f"{tmp_path}/run/model_config.json: missing" in proc.stderr
  assert not (tmp_path / "o").exists()
