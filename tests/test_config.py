"""Config loading (`--config=file.py[:variant]`, typed overrides, locking) and validation messages."""
import pathlib

import ml_collections
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
    (["--config.mesh.dcn_data=3"], 8, "config.mesh.dcn_data=3: must be >= 1 and divide the 8 devices"),
    (["--config.mesh.dcn_data=2", "--config.train.batch_queries=12"], 8,
     r"batch_queries=12 \(per accumulation step 12\) is not divisible by the mesh's data\*fsdp = 8 "
     r"\(config.mesh.data=1 x config.mesh.dcn_data=2 slices, config.mesh.fsdp=4\)"),
    (["--config.train.group_size=1"], 8, r"config.train.group_size=1: must be >= 2"),
    (["--config.train.lm_loss_chunk=-1"], 8, r"config.train.lm_loss_chunk=-1: must be >= 0 \(0 = all positions"),
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


@pytest.mark.parametrize("source, message", [
    ('from o1jax import config as o1config\n\ndef get_config(arg=None):\n  c = o1config.base_config()\n'
     '  c.train.steps = "ten"\n  return c\n',
     r"bad.py:5 \(c.train.steps = \"ten\"\): TypeError: Could not override field 'steps'"),
    ("def get_config(arg=None):\n  return {'seed': 1}\n",
     r"bad.py: get_config\(\) returned a dict, expected an ml_collections.ConfigDict"),
    ("def get_config(arg=None):\n  return (\n", r"bad.py:2: SyntaxError: '\(' was never closed"),
    ("CONFIG = 1\n", r"bad.py: defines no get_config\(arg=None\)"),
    ("import no_such_module\n", r"bad.py:1 \(import no_such_module\): ModuleNotFoundError: No module named"),
])
def test_a_bad_config_file_is_named_with_its_line(tmp_path, source, message):
  (tmp_path / "bad.py").write_text(source)
  with pytest.raises(o1config.ConfigError, match=message) as e:
    o1config.load([f"--config={tmp_path / 'bad.py'}"])
  assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_command_line_messages_are_one_plain_line():
  with pytest.raises(o1config.ConfigError) as e:
    load("--config.train.stepz=3")
  assert str(e.value) == ("bad command line --config.train.stepz=3: unknown key 'stepz'; Did you mean \"steps\" "
                          "instead of \"stepz\"?")
  with pytest.raises(o1config.ConfigError, match=r"--config.nope.x=1: unknown key 'nope'$"):
    load("--config.nope.x=1")
  with pytest.raises(o1config.ConfigError, match=r"unexpected argument\(s\) stray"):
    load("stray")


def test_values_of_the_wrong_type_are_named_by_validation():
  c = load()
  with c.unlocked():  # ConfigDict checks the type of a field it sets, not of the fields of a group it replaces
    c.train.steps = None
    c.train.lengths = ml_collections.ConfigDict({"query": 8, "query_thought": 16, "doc": "12"})
    c.data.train_files = ("a", 3)
    c.checkpoint = ml_collections.ConfigDict({**c.checkpoint.to_dict(), "fallback": "yes"})
  with pytest.raises(o1config.ConfigError) as e:
    o1config.validate(c, 8)
  assert str(e.value).splitlines()[1:] == [
      "  config.checkpoint.fallback='yes': expected a bool, got a str",
      "  config.data.train_files=('a', 3): expected a tuple of strings",
      "  config.train.lengths.doc='12': expected an int, got a str",
      "  config.train.steps=None: expected an int, got a NoneType"]
