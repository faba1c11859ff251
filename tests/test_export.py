"""Export of a trained retriever: a LoRA run of tiny_cpu is exported with `o1jax.export` and loaded back three
ways, each driven by the model card's own code: the merged model with transformers (`AutoModelForCausalLM` +
`AutoTokenizer`), the base model with the PEFT adapter (on the exported base/, and on the backbone as it was before
the special tokens, whose grown rows only the adapter fills), and sentence-transformers. Each computes the same
embeddings as o1jax on the restored training state (<= 1e-4, fp32); the causal models generate the same greedy
thoughts as `o1jax.generate.Generator`. The export refuses to write over the checkpoint it reads.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from o1jax import checkpoint, config as o1config, export, lora, sharding, templates, train
from o1jax.data import synthetic
from o1jax.export import model_card
from o1jax.export.__main__ import main as export_main
from o1jax.generate import Generator
from o1jax.retrieval import loading
from o1jax.retrieval.embedder import SequenceEmbedder
from o1jax.retrieval.retriever import Retriever
from o1jax.tokenizer import SPECIAL_TOKENS, SpecialIds
from o1jax.training.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, EVERY = 40, 20
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny_cpu LoRA run (8 devices, data parallel) checkpointed at steps 20 and 40; as in METHOD §4, the
  embeddings stay frozen but for the special tokens' rows."""
  out = tmp_path_factory.mktemp("run") / "ckpt"
  train.main([f"--config={ROOT / 'configs' / 'tiny_cpu.py'}", f"--config.train.steps={STEPS}",
              "--config.train.finetune=lora", "--config.train.lora.rank=4", "--config.train.lora.alpha=8.0",
              "--config.train.train_embeddings=false",
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
def original_base(hf_dir, tmp_path_factory) -> pathlib.Path:
  """The exported base/ as the backbone was before the run added the four special tokens (the last four ids):
  what a run from a Hugging Face directory finds there."""
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert sorted(tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))) == list(range(len(tok) - 4, len(tok)))
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir / export.BASE_DIR)
  model.resize_token_embeddings(len(tok) - 4)
  out = tmp_path_factory.mktemp("original") / "base"
  model.save_pretrained(out)
  return out


def card_namespace(hf_dir: pathlib.Path, base: pathlib.Path | None) -> dict:
  """The namespace of the model card's transformers snippet run against the export; with `base`, followed by the
  card's PEFT snippet on that base model."""
  readme = (hf_dir / "README.md").read_text()
  code = readme.split("```python\n", 1)[1].split("```", 1)[0]
  assert code == model_card.snippet(hf_dir.name, export.Thinking())
  namespace: dict = {}
  torch.manual_seed(0)
  exec(compile(model_card.snippet(str(hf_dir), export.Thinking()), "README.md", "exec"), namespace)  # noqa: S102
  if base is not None:
    peft_code = readme.split("```python\n")[3].split("```", 1)[0]
    assert peft_code == model_card.peft_snippet(hf_dir.name, f"{hf_dir.name}/base")
    exec(compile(model_card.peft_snippet(str(hf_dir), str(base)), "README.md", "exec"), namespace)  # noqa: S102
  return namespace


@pytest.fixture(scope="module")
def merged_card(hf_dir) -> dict:
  return card_namespace(hf_dir, None)


@pytest.fixture(scope="module", params=["merged", "adapter_on_base", "adapter_on_original_base"])
def card(request, hf_dir, original_base) -> dict:
  """The card's code with each of the export's causal models: merged, or base model + PEFT adapter."""
  base = {"merged": None, "adapter_on_base": hf_dir / export.BASE_DIR, "adapter_on_original_base": original_base}
  return card_namespace(hf_dir, base[request.param])


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
               "after the final norm", "L2-normalized", "title text <emb>", "library_name: transformers",
               "encode_document", "**without\nthinking**", "To **think first**", "## PEFT adapter",
               "rank 4, alpha 8 on\nq_proj, k_proj", "trainable tokens", "`base/`: the run's backbone"):
    assert fact in readme, fact
  assert not list(hf_dir.parent.glob(".hf.*")), "staging directories left behind"


def test_adapter_holds_lora_and_the_special_rows_for_the_exported_base(hf_dir, training):
  _, _, tok = training
  config = json.loads((hf_dir / export.ADAPTER_DIR / "adapter_config.json").read_text())
  special = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
  assert config["trainable_token_indices"] == {"embed_tokens": special, "lm_head": special}
  assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (4, 8.0, None)
  assert config["base_model_name_or_path"] == str(hf_dir / export.BASE_DIR)
  base = transformers.AutoConfig.from_pretrained(hf_dir / export.BASE_DIR)
  assert base.vocab_size == len(tok)
  # The exported base model is the run's backbone: the merged model differs from it only by the LoRA terms.
  merged = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
  backbone = transformers.AutoModelForCausalLM.from_pretrained(hf_dir / export.BASE_DIR).state_dict()
  differ = {name for name in merged if not torch.equal(merged[name], backbone[name])}
  assert differ == {name for name in merged if name.split(".")[-2] in lora.TARGETS}, differ


def test_sentence_transformers_encodes_like_the_retriever(hf_dir, ckpt_dir):
  namespace: dict = {}
  exec(compile(model_card.st_snippet(str(hf_dir)), "README.md", "exec"), namespace)  # noqa: S102
  model = namespace["st_model"]
  assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
  retriever = Retriever(*loading.load_checkpoint_for_inference(ckpt_dir), fingerprint=None)
  docs = [templates.document_text(f"title {i}", r["positives"][0]) for i, r in enumerate(records(6))]
  queries = [r["query"] for r in records(6)]
  np.testing.assert_allclose(model.encode_document(docs), retriever.encode_docs(docs), rtol=0, atol=ATOL)
  np.testing.assert_allclose(model.encode_query(queries), retriever.encode_queries(queries, think=0), rtol=0,
                             atol=ATOL)
  np.testing.assert_allclose(namespace["doc_vectors"], retriever.encode_docs(["Tides The Moon's gravity ..."]),
                             rtol=0, atol=ATOL)


def test_transformers_last_hidden_state_is_after_the_final_norm(merged_card):
  model = merged_card["model"]
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


@pytest.fixture(scope="module")
def o1jax_embeddings(training) -> tuple[list[list[int]], np.ndarray]:
  """(sequences, o1jax's embeddings of them on the training state): per record its query with and without the
  thought, then its document."""
  trainer, state, tok = training
  special = SpecialIds.from_tokenizer(tok)
  lengths = templates.Lengths()
  words = lambda text: tok(text, add_special_tokens=False)["input_ids"]
  sequences = []
  for r in records(6):
    for thought in (words(r["thought"]), []):
      sequences.append(templates.query_sequence(words(r["query"]), thought, special, lengths)[0])
    sequences.append(templates.document_sequence(words(r["positives"][0]), special, 512))
  embedder = SequenceEmbedder(trainer.model_cfg, jax.device_get(trainer.inference_params(state)), trainer.mesh)
  return sequences, embedder.embed(sequences)


def test_card_embeddings_equal_o1jax(card, training, o1jax_embeddings):
  _, _, tok = training
  special = SpecialIds.from_tokenizer(tok)
  words = lambda text: tok(text, add_special_tokens=False)["input_ids"]
  sequences, ours = o1jax_embeddings
  for i, r in enumerate(records(6)):
    prefix = card["query_prefix"](r["query"])
    assert prefix == templates.query_prefix(words(r["query"]), special, templates.Lengths())
    assert card["query_sequence"](prefix, words(r["thought"])) == sequences[3 * i]
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


def test_card_samples_k_thoughts_and_averages(merged_card, hf_dir):
  card = merged_card
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
  (tmp_path / "empty").mkdir()
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "o1jax.export", f"--checkpoint={tmp_path / 'empty'}",
                         f"--out={tmp_path / 'o'}"], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert f"{tmp_path}/empty/run/model_config.json: missing" in proc.stderr
  assert not (tmp_path / "o").exists()


def snapshot(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_out_at_inside_or_around_the_checkpoint_is_refused_and_nothing_is_touched(ckpt_dir, tmp_path):
  before = snapshot(ckpt_dir)
  link = tmp_path / "link"
  link.symlink_to(ckpt_dir)
  for out, where in ((ckpt_dir, "is"), (link, "is"), (ckpt_dir / "run", "is inside"),
                     (ckpt_dir / "new" / "hf", "is inside"), (ckpt_dir.parent, "holds"), ("/", "holds")):
    with pytest.raises(ValueError, match=f"--out={out} {where} the checkpoint directory"):
      export.export(ckpt_dir, out, overwrite=True)
  assert snapshot(ckpt_dir) == before and not (ckpt_dir / "new").exists()


def test_cli_refuses_to_export_over_its_checkpoint_in_one_line(ckpt_dir):
  before = snapshot(ckpt_dir)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "o1jax.export", f"--checkpoint={ckpt_dir}", f"--out={ckpt_dir}",
                         "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr == (f"o1jax.export: --out={ckpt_dir} is the checkpoint directory {ckpt_dir}; "
                         "write the export elsewhere\n")
  assert snapshot(ckpt_dir) == before


def test_overwrite_replaces_an_earlier_export_but_never_another_directory(ckpt_dir, tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=f"--out={data} exists \\(pass --overwrite to replace it\\)"):
    export.export(ckpt_dir, data)
  with pytest.raises(FileExistsError, match=f"--out={data} exists and is no model directory"):
    export.export(ckpt_dir, data, overwrite=True)
  assert (data / "notes.txt").read_text() == "mine"
  earlier = tmp_path / "hf"
  export_main([f"--checkpoint={ckpt_dir}", f"--out={earlier}", f"--step={EVERY}"])
  (earlier / "stale.txt").write_text("from before")
  export_main([f"--checkpoint={ckpt_dir}", f"--out={earlier}", "--overwrite"])
  assert not (earlier / "stale.txt").exists() and (earlier / "adapter" / "adapter_config.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf"]


def test_run_from_a_hugging_face_directory_exports_an_adapter_for_that_directory(ckpt_dir, original_base, hf_dir,
                                                                                 o1jax_embeddings, tmp_path):
  # The same run, as if it had started from the Hugging Face directory `original_base` (the backbone before the
  # special tokens): the export names that directory instead of writing base/.
  run = tmp_path / "ckpt"
  shutil.copytree(ckpt_dir, run)
  config = json.loads((run / "run" / "train_config.json").read_text())
  config["model"].update(source="hf", path=str(original_base))
  (run / "run" / "train_config.json").write_text(json.dumps(config))
  out = export.export(run, tmp_path / "hf")
  assert not (out / export.BASE_DIR).exists()
  adapter_config = json.loads((out / export.ADAPTER_DIR / "adapter_config.json").read_text())
  assert adapter_config["base_model_name_or_path"] == str(original_base)
  assert f'AutoModelForCausalLM.from_pretrained("{original_base}"' in (out / "README.md").read_text()
  # peft finds the base by that name and grows its vocabulary to the tokenizer saved with the adapter.
  model = peft.AutoPeftModelForCausalLM.from_pretrained(out / export.ADAPTER_DIR).eval()
  reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  sequences, ours = o1jax_embeddings
  for sequence, vector in zip(sequences[:3], ours):
    ids = torch.tensor([sequence])
    with torch.no_grad():
      got, want = model(ids, output_hidden_states=True), reference(ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=ATOL)
    np.testing.assert_allclose(torch.nn.functional.normalize(got.hidden_states[-1][0, -1], dim=-1).numpy(), vector,
                               rtol=0, atol=ATOL)
