"""Config loading (`--config=file.py[:variant]`, typed overrides, locking) and validation messages."""
import pathlib

import pytest

from o1jax import config as o1config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load(*overrides, name="tiny_cpu.py"):
  return o1config.load([f"--config={CONFIGS / name}", *overrides])


def test_overrides_are_typed_and_variants_selected():
  c = load("--config.train.steps=7", "--config.optim.lr=0.5", "--config.train.lora.targets=('q_proj',)")
  assert (c.train.steps, c.optim.lr, tuple(c.train.lora.targets)) == (7, 0.5, ("q_proj",))
  assert load(name="mistral7b.py:full").train.finetune == "full"
  assert load(name="mistral7b.py").train.finetune == "lora"
  with pytest.raises(o1config.ConfigError, match="unknown variant 'fll'"):
    load(name="mistral7b.py:fll")


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stepz=3"], r"stepz.*Did you mean \"steps\""),
    (["--config.train.steps=abc"], r"config.train.steps=abc.*invalid literal"),
    (["--config.nope.x=1"], "nope"),
])
def test_bad_command_lines(argv, message):
  with pytest.raises(o1config.ConfigError, match=message):
    load(*argv)


def test_missing_config_flag_and_file():
  with pytest.raises(o1config.ConfigError, match="missing --config"):
    o1config.load(["--config.train.steps=1"])
  with pytest.raises(o1config.ConfigError, match="no_such.py"):
    o1config.load(["--config=configs/no_such.py"])


def test_every_shipped_config_validates_once_its_paths_exist(tmp_path):
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "config.json").write_text("{}")
  (tmp_path / "model.gguf").write_bytes(b"")
  (tmp_path / "train-0.tfrecord").write_bytes(b"")
  files = f"--config.data.train_files=('{tmp_path}/train-*.tfrecord',)"
  assert o1config.validate(load(), 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert o1config.validate(load(f"--config.model.path={tmp_path / 'model.gguf'}", name="smollm2_135m.py"), 1)
  for name in ("mistral7b.py", "mistral7b.py:full", "llama3_8b.py", "qwen2_5_7b.py"):
    c = load(f"--config.model.path={tmp_path / 'model'}", files, name=name)
    assert o1config.validate(c, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert c.train.batch_queries * c.train.group_size == 1024
    o1config.model_config(c)  # the architecture is a valid ModelConfig


@pytest.mark.parametrize("overrides, devices, message", [
    (["--config.train.batch_queries=12"], 8,
     r"config.train.batch_queries=12 \(per accumulation step 12\) is not divisible by the mesh's data\*fsdp = 8"),
    (["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.batch_queries=6"], 8,
     "data\\*fsdp = 4"),
    (["--config.train.grad_accum_steps=4", "--config.train.batch_queries=16"], 8, "per accumulation step 4"),
    (["--config.mesh.data=3"], 8, "config.mesh: 8 devices are not divisible by the fixed axes' product 3"),
    (["--config.mesh.data=-1"], 8, "config.mesh: more than one axis is -1"),
    (["--config.mesh.fsdp=16"], 8, "needs 16 devices; 8 available"),
    (["--config.train.group_size=1"], 8, r"config.train.group_size=1: must be >= 2"),
    (["--config.train.lengths.query_thought=10"], 8,
     r"config.train.lengths.query_thought=10 cannot hold the query template: needs >= lengths.query \+ 7 = 15"),
    (["--config.train.lengths.doc=2"], 8, "config.train.lengths.doc=2 cannot hold the document template"),
    (["--config.model.source=hf", "--config.model.path=/no/such/dir"], 8,
     r"config.model.path='/no/such/dir': no Hugging Face model directory"),
    (["--config.model.source=gguf", "--config.model.path=/no/such.gguf"], 8, "GGUF file not found"),
    (["--config.data.kind=tfrecord"], 8, "config.data.train_files: empty"),
    (["--config.data.kind=tfrecord", "--config.data.train_files=('/no/such-*.tfrecord',)"], 8,
     "'/no/such-\\*.tfrecord' matches no file"),
    (["--config.model.remat_policy=some"], 8, "config.model.remat_policy='some': expected one of 'none'"),
    (["--config.train.finetune=lora", "--config.train.lora.targets=('qproj',)"], 8,
     r"config.train.lora.targets: \['qproj'\] not among"),
    (["--config.train.tau=0.0"], 8, "config.train.tau=0.0: must be > 0"),
    (["--config.train.w_distill=1.0"], 8, "synthetic data has no teacher scores"),
    (["--config.train.batch_queries=512"], 8, "256 queries"),
    (["--config.model.arch.num_key_value_heads=3"], 8, "config.model.arch: num_attention_heads=4 is not a multiple"),
])
def test_validation_names_the_key(overrides, devices, message):
  with pytest.raises(o1config.ConfigError, match=message):
    o1config.validate(load(*overrides), devices)


def test_all_problems_reported_together_and_unknown_keys():
  with pytest.raises(o1config.ConfigError) as e:
    o1config.validate(load("--config.train.group_size=1", "--config.train.tau=-1.0"), 8)
  assert "group_size=1" in str(e.value) and "tau=-1.0" in str(e.value)
  c = load()
  with c.unlocked():
    c.train.extra = 1
    del c.optim.b1
  with pytest.raises(o1config.ConfigError, match="config.optim.b1: missing key\n  config.train.extra: unknown key"):
    o1config.validate(c, 8)
  c = load()
  with c.unlocked():
    c.model.arch.heads = 4
  with pytest.raises(o1config.ConfigError, match="config.model.arch.heads: unknown key"):
    o1config.validate(c, 8)
