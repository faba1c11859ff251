"""Trainer configuration: the one config tree, `--config=file.py[:variant]` loading with overrides, validation.

A config file defines `get_config(arg=None)` returning `base_config()` with its values set; `arg` is the text after
`:` in `--config=configs/x.py:variant`. A file that cannot be loaded (a syntax error, an exception in
`get_config`, a result that is no ConfigDict) is a ConfigError naming the file and line. Overrides `--config.a.b=v`
are typed by the field they replace; configs are locked, so a misspelt key is an error. `validate` then checks
every value against the tree (keys and types), the mesh and the templates before anything is compiled, and
reports every problem at once, each naming its key. `settings` turns a valid config into the typed, frozen
sections the library takes: the ConfigDict stops at the command line.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import importlib.util
import json
import linecache
import os
import pathlib
import traceback
from typing import Any

from absl import flags
import ml_collections
from ml_collections import config_flags

from o1jax import checkpoint, lora, optim, sharding, storage, templates
from o1jax.data.batching import BatchSpec
from o1jax.data.synthetic import SyntheticSpec
from o1jax.model import REMAT_POLICIES, ModelConfig
from o1jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from o1jax.model.config import DTYPES, LAYOUT_FIELDS, RUNTIME_FIELDS
from o1jax.templates import DOC_TEMPLATE_TOKENS, QUERY_TEMPLATE_TOKENS
from o1jax.training.logger import LogSettings
from o1jax.training.objective import Objective
from o1jax.training.sources import DataSource, ModelSource
from o1jax.training.trainable import Selection
from o1jax.training.trainer import TrainerSettings


class ConfigError(ValueError):
  """One or more invalid config values; the message has one line per problem, each naming its key."""


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer knows, with defaults (the reference recipe of METHOD §4 where it has one)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(
      source="random",  # 'random' | 'hf' (a Hugging Face directory) | 'gguf' (a GGUF file)
      path="",
      # Architecture for source 'random' and for shape-only compilation (ModelConfig fields; vocab_size 0 = the
      # tokenizer's size). Ignored when weights are loaded: the checkpoint's own config is used.
      arch=dict(family="llama", vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                rope_scaling=None, max_position_embeddings=4096, sliding_window=None, attention_bias=False,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None),
      dtype="float32",
      param_dtype="float32",
      remat_policy="none",  # what each layer keeps for the backward pass (o1jax.model.REMAT_POLICIES)
      attention="auto",  # einsum | xla | cudnn | auto (cuDNN where it can run): o1jax.model.attention
      unroll_layers=False,  # straight-line layers: faster CPU steps, compile time grows with depth
  )
  # Sizes within a slice (one may be -1: the rest of the slice's devices); dcn_data: slices joined over the
  # data-center network, the data axis spanning them (o1jax.sharding: multi-slice).
  c.mesh = dict(data=1, fsdp=-1, tensor=1, dcn_data=1)
  c.train = dict(
      steps=1000,
      batch_queries=64,
      group_size=16,
      lengths=dict(query=32, query_thought=256, doc=192),
      tau=0.02,
      # L = w_ctr * L_ctr + w_gen * L_gen on the global batch. The reference's lambda = 0.8 / 0.2 acts through
      # PyTorch DDP gradient averaging as w_ctr = 0.8 / W on W ranks (METHOD §3).
      w_ctr=0.8,
      w_gen=0.2,
      w_distill=0.0,
      thought_drop=0.1,
      grad_accum_steps=1,
      gradcache_chunk=0,
      # Query positions per pass of the LM head in the behaviour-cloning loss, their logits recomputed in the
      # backward pass: the [queries, length, vocab] float32 logits are never whole (0 = all positions at once).
      lm_loss_chunk=0,
      finetune="lora",
      lora=dict(rank=32, alpha=64.0, dropout=0.1, targets=lora.TARGETS),
      train_special_tokens=True,
      train_embeddings=False,
  )
  c.optim = dict(lr=1e-4, warmup_frac=0.1, warmup="log", decay="linear", weight_decay=0.0, b1=0.9, b2=0.999,
                 eps=1e-8, clip_norm=1.0)
  # skip_bad: a record that cannot be read or batched (corrupt, undecodable, empty fields) is replaced by the next
  # usable one instead of stopping the run; corrupt TFRecord records are found and reported at start-up. Records
  # keep their indices, so a run stopped by a bad record resumes with skip_bad at the same example.
  c.data = dict(kind="synthetic", train_files=(), shuffle_seed=0, skip_bad=False,
                synthetic={f.name: f.default for f in dataclasses.fields(SyntheticSpec)})
  # fallback: when the latest step cannot be restored (unreadable, partial, or its arrays changed since the save:
  # checksums), move it to <dir>/unrestorable/ and resume from the step before; off: stop and name that step.
  c.checkpoint = dict(dir="", every=100, keep=3, async_save=True, fallback=False)
  c.log = dict(every=10, tensorboard_dir="", jsonl="")  # jsonl: every logged step's metrics, one JSON per line
  # Every `every` steps (0 = never; a multiple of log.every) and at the end: retrieval metrics on the first
  # `max_queries` (0 = all) judged queries of a BEIR dev set, queries embedded with `think` thoughts (0 = none).
  c.eval = dict(every=0, dataset="", split="test", max_queries=0, think=0, max_new_tokens=128)
  return c


def pod_recipe(arch: dict, variant: str | None) -> ml_collections.ConfigDict:
  """The reference recipe of METHOD §4 for a 7B-class model on a pod: variant 'lora' (default) or 'full'.

  bf16 compute, FSDP over every device, 64 queries x 16 passages globally, lengths 32/256/192, tau 0.02, AdamW
  lr 1e-4 with 10% logarithmic warmup then linear decay, full remat. The user sets model.path and data.train_files.
  """
  if variant not in (None, "", "lora", "full"):
    raise ValueError(f"unknown variant {variant!r}; expected 'lora' or 'full'")
  c = base_config()
  c.model.source = "hf"
  c.model.arch.update(arch)
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=1)  # several slices: dcn_data=N (launch/tpu_pod.sh --slices)
  c.train.update(steps=7800, batch_queries=64, group_size=16, tau=0.02, thought_drop=0.1)  # ~1 MS MARCO epoch
  c.data.kind = "tfrecord"
  c.checkpoint.update(every=500, keep=3)
  if variant == "full":
    # Master weights and Adam moments stay fp32 for full fine-tuning; LoRA keeps the frozen base in bf16.
    c.model.param_dtype = "float32"
    c.train.finetune = "full"
    c.optim.lr = 1e-5
  else:
    c.model.param_dtype = "bfloat16"
    c.train.finetune = "lora"
  return c


def _where(error: BaseException, path: str) -> str:
  """`path:line (source)` of the innermost frame of `error` in the config file, else `path`."""
  line = None
  for frame, lineno in traceback.walk_tb(error.__traceback__):
    if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
      line = lineno
  if line is None:
    return path
  return f"{path}:{line} ({linecache.getline(path, line).strip()})"


def _one_line(error: BaseException) -> str:
  # ConfigDict wraps a missing key's KeyError in an AttributeError, and str() of a KeyError is the repr of its
  # message (quotes and newlines escaped): unwrap both.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = f"unknown key {error.args[0]}" if isinstance(error, KeyError) and error.args else str(error)
  return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config([variant])` of `spec` = 'path.py[:variant]'; every failure names the file (and line)."""
  path, colon, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config={spec}: no config file {path!r}")
  try:
    module_spec = importlib.util.spec_from_file_location(f"o1jax_config_file_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise ConfigError(f"{path}: defines no get_config(arg=None)")
    config = get_config(variant) if colon else get_config()
  except ConfigError:
    raise
  except SyntaxError as e:
    raise ConfigError(f"{e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}") from e
  except Exception as e:  # whatever the user's file raises is a config error; the chain keeps the traceback
    raise ConfigError(f"{_where(e, path)}: {type(e).__name__}: {_one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned a {type(config).__name__}, expected an "
                      "ml_collections.ConfigDict (start from o1jax.config.base_config())")
  return config


def load(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """The locked config of `--config=file.py[:variant]` and its `--config.a.b=v` overrides (not yet validated)."""
  files = [a for a in argv if a.startswith("--config=")]
  if len(files) != 1:
    raise ConfigError("missing --config=path/to/config.py[:variant]" if not files else
                      f"--config given {len(files)} times: {' '.join(files)}")
  config = _config_file(files[0].removeprefix("--config="))
  argv = ["o1jax.train", *(a for a in argv if a not in files)]
  values = flags.FlagValues()
  try:
    # The override flags (--config.a.b) are defined from `sys_argv`, typed by the fields they replace.
    config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=True, sys_argv=argv)
    unparsed = values(argv)[1:]
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"bad command line {' '.join(argv[1:])}: {_one_line(e)}") from e
  if unparsed:
    raise ConfigError(f"unexpected argument(s) {' '.join(unparsed)}: the trainer takes only --config=... and "
                      "--config.a.b=v")
  return values.config


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
  """The ModelConfig described by config.model.arch and the runtime fields (vocab_size 0 -> `vocab_size`)."""
  arch = dict(config.model.arch)
  if not arch["vocab_size"]:
    arch["vocab_size"] = vocab_size
  return ModelConfig(**arch, **{name: config.model[name] for name in RUNTIME_FIELDS})


def _type_problem(value, reference) -> str | None:
  """Why `value` cannot stand where the base config has `reference` (None: any value may)."""
  if reference is None:
    return None
  if isinstance(reference, (tuple, list)):  # every sequence in the tree is of strings (file patterns, targets)
    ok = isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)
    return None if ok else "expected a tuple of strings"
  if isinstance(reference, bool) or isinstance(value, bool):
    ok = isinstance(value, bool) and isinstance(reference, bool)
  elif isinstance(reference, float):
    ok = isinstance(value, (int, float))
  else:
    ok = isinstance(value, type(reference))
  return None if ok else f"expected {_a(type(reference).__name__)}, got {_a(type(value).__name__)}"


def _a(noun: str) -> str:
  return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _key_problems(config, reference, prefix: str) -> list[str]:
  """Unknown, missing and mistyped keys (ConfigDict types a field it sets, not the fields of a group a config file
  replaces whole)."""
  problems = []
  for key in sorted(set(config) | set(reference)):
    name = f"{prefix}.{key}"
    if key not in reference:
      if prefix != "config.model.arch":  # reported with the ModelConfig fields by _arch_problems
        problems.append(f"{name}: unknown key")
    elif key not in config:
      problems.append(f"{name}: missing key")
    elif isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        problems.append(f"{name}: expected a group of keys, got {config[key]!r}")
      else:
        problems += _key_problems(config[key], reference[key], name)
    elif (problem := _type_problem(config[key], reference[key])) is not None:
      problems.append(f"{name}={config[key]!r}: {problem}")
  return problems


def _choice(problems: list[str], name: str, value, choices) -> None:
  if value not in choices:
    problems.append(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _path_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = []
  m, d = config.model, config.data
  if m.source == "hf" and not os.path.isfile(os.path.join(m.path, "config.json")):
    problems.append(f"config.model.path={m.path!r}: no Hugging Face model directory (config.json) there")
  if m.source == "gguf" and not os.path.isfile(m.path):
    problems.append(f"config.model.path={m.path!r}: GGUF file not found")
  if m.source == "random" and d.kind != "synthetic":
    problems.append("config.model.source='random' trains only on data.kind 'synthetic' (whose tokenizer it uses)")
  if d.kind == "tfrecord":
    if not d.train_files:
      problems.append("config.data.train_files: empty; data.kind 'tfrecord' needs file patterns")
    for pattern in d.train_files:
      if not storage.glob(pattern):
        problems.append(f"config.data.train_files: {pattern!r} matches no file")
  return problems


def _arch_problems(config: ml_collections.ConfigDict) -> list[str]:
  fields = {f.name for f in dataclasses.fields(ModelConfig)} - set(RUNTIME_FIELDS) - set(LAYOUT_FIELDS)
  unknown = sorted(set(config.model.arch) - fields)
  if unknown:
    return [f"config.model.arch.{k}: unknown key (ModelConfig fields: {', '.join(sorted(fields))})" for k in unknown]
  try:
    model_config(config, vocab_size=1)
  except (TypeError, ValueError) as e:
    return [f"config.model.arch: {e}"]
  return []


def _eval_problems(e: ml_collections.ConfigDict, log_every: int) -> list[str]:
  if e.every == 0:
    return []
  problems = []
  if e.every < 0 or (log_every >= 1 and e.every % log_every):
    problems.append(f"config.eval.every={e.every}: must be 0 (off) or a positive multiple of "
                    f"config.log.every={log_every} (eval metrics are logged with the training metrics)")
  if not os.path.isdir(os.path.join(e.dataset, "qrels")):
    problems.append(f"config.eval.dataset={e.dataset!r}: no BEIR directory (with qrels/) there")
  if e.max_queries < 0 or e.think < 0 or e.max_new_tokens < 1:
    problems.append(f"config.eval: max_queries={e.max_queries} and think={e.think} must be >= 0, "
                    f"max_new_tokens={e.max_new_tokens} >= 1")
  return problems


def validate(config: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
  """Raises ConfigError listing every problem; returns the resolved mesh shape."""
  problems = _key_problems(config, base_config(), "config")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  m, t, o, d = config.model, config.train, config.optim, config.data
  _choice(problems, "config.model.source", m.source, ("random", "hf", "gguf"))
  _choice(problems, "config.model.dtype", m.dtype, DTYPES)
  _choice(problems, "config.model.param_dtype", m.param_dtype, DTYPES)
  _choice(problems, "config.model.remat_policy", m.remat_policy, tuple(REMAT_POLICIES))
  _choice(problems, "config.model.attention", m.attention, ATTENTION_IMPLEMENTATIONS)
  _choice(problems, "config.train.finetune", t.finetune, ("full", "lora"))
  _choice(problems, "config.optim.warmup", o.warmup, optim.WARMUPS)
  _choice(problems, "config.optim.decay", o.decay, optim.DECAYS)
  _choice(problems, "config.data.kind", d.kind, ("synthetic", "tfrecord"))
  problems += _arch_problems(config)
  mesh = None
  try:
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, device_count)))
  except ValueError as e:
    problems.append(str(e))
  if t.steps < 1:
    problems.append(f"config.train.steps={t.steps}: must be >= 1")
  if t.group_size < 2:
    problems.append(f"config.train.group_size={t.group_size}: must be >= 2 (1 positive + at least 1 negative)")
  if t.batch_queries < 1 or t.grad_accum_steps < 1 or t.batch_queries % t.grad_accum_steps:
    problems.append(f"config.train.batch_queries={t.batch_queries} must be a positive multiple of "
                    f"config.train.grad_accum_steps={t.grad_accum_steps}")
  elif mesh is not None:
    shards, slices = mesh["data"] * mesh["fsdp"], sharding.dcn_data(config.mesh)
    micro = t.batch_queries // t.grad_accum_steps
    if micro % shards:
      problems.append(f"config.train.batch_queries={t.batch_queries} (per accumulation step {micro}) is not "
                      f"divisible by the mesh's data*fsdp = {shards} (config.mesh.data={mesh['data'] // slices}"
                      + (f" x config.mesh.dcn_data={slices} slices" if slices > 1 else "")
                      + f", config.mesh.fsdp={mesh['fsdp']})")
  if t.gradcache_chunk < 0:
    problems.append(f"config.train.gradcache_chunk={t.gradcache_chunk}: must be >= 0 (0 = off)")
  if t.lm_loss_chunk < 0:
    problems.append(f"config.train.lm_loss_chunk={t.lm_loss_chunk}: must be >= 0 (0 = all positions at once)")
  lengths = t.lengths
  if lengths.query < 1:
    problems.append(f"config.train.lengths.query={lengths.query}: must be >= 1")
  if lengths.query_thought < lengths.query + QUERY_TEMPLATE_TOKENS:
    problems.append(f"config.train.lengths.query_thought={lengths.query_thought} cannot hold the query template: "
                    f"needs >= lengths.query + {QUERY_TEMPLATE_TOKENS} = {lengths.query + QUERY_TEMPLATE_TOKENS} "
                    f"([BOS] <query> q </query> <thought> t EOS <emb>)")
  if lengths.doc < DOC_TEMPLATE_TOKENS:
    problems.append(f"config.train.lengths.doc={lengths.doc} cannot hold the document template: needs >= "
                    f"{DOC_TEMPLATE_TOKENS} ([BOS] text <emb>)")
  if t.tau <= 0:
    problems.append(f"config.train.tau={t.tau}: must be > 0")
  for key in ("w_ctr", "w_gen", "w_distill"):
    if t[key] < 0:
      problems.append(f"config.train.{key}={t[key]}: must be >= 0")
  if t.w_ctr + t.w_gen <= 0:
    problems.append("config.train.w_ctr + config.train.w_gen: must be > 0")
  if t.w_distill > 0 and d.kind == "synthetic":
    problems.append(f"config.train.w_distill={t.w_distill}: the synthetic data has no teacher scores")
  if not 0 <= t.thought_drop <= 1:
    problems.append(f"config.train.thought_drop={t.thought_drop}: must be in [0, 1]")
  if t.finetune == "lora":
    if t.lora.rank < 1:
      problems.append(f"config.train.lora.rank={t.lora.rank}: must be >= 1")
    if not 0 <= t.lora.dropout < 1:
      problems.append(f"config.train.lora.dropout={t.lora.dropout}: must be in [0, 1)")
    bad = [x for x in t.lora.targets if x not in lora.TARGETS] or ([] if t.lora.targets else ["(none)"])
    if bad:
      problems.append(f"config.train.lora.targets: {bad} not among {', '.join(lora.TARGETS)}")
  if o.lr <= 0:
    problems.append(f"config.optim.lr={o.lr}: must be > 0")
  if not 0 <= o.warmup_frac < 1:
    problems.append(f"config.optim.warmup_frac={o.warmup_frac}: must be in [0, 1)")
  for key in ("b1", "b2"):
    if not 0 <= o[key] < 1:
      problems.append(f"config.optim.{key}={o[key]}: must be in [0, 1)")
  if o.clip_norm < 0 or o.weight_decay < 0 or o.eps <= 0:
    problems.append("config.optim.clip_norm, weight_decay must be >= 0 and eps > 0")
  if d.kind == "synthetic":
    spec = SyntheticSpec(**d.synthetic)
    count = spec.num_topics * spec.docs_per_topic * spec.queries_per_doc
    if spec.docs_per_topic < 2 or count < t.batch_queries:
      problems.append(f"config.data.synthetic: {count} queries with docs_per_topic={spec.docs_per_topic}; need "
                      f">= config.train.batch_queries={t.batch_queries} queries and docs_per_topic >= 2")
  if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
    problems.append("config.checkpoint.every and config.checkpoint.keep: must be >= 1")
  if config.log.every < 1:
    problems.append(f"config.log.every={config.log.every}: must be >= 1")
  problems += _eval_problems(config.eval, config.log.every)
  problems += _path_problems(config)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  return mesh


# The keys whose values shape the training state (its leaves and their shapes): a checkpoint saved under other
# values cannot be restored.
STATE_KEYS = ("model.source", "model.path", "model.arch.", "train.finetune", "train.lora.", "train.train_embeddings",
              "train.train_special_tokens", "data.synthetic.")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changed_keys(saved: Mapping[str, Any], config: ml_collections.ConfigDict, prefixes: Sequence[str]) -> list[str]:
  """`config.a.b: old -> new` for each key under `prefixes` whose value in `config` differs from `saved` (the JSON of
  an earlier run's config)."""
  before, now = _flatten(saved), _flatten(json.loads(config.to_json()))
  return [f"config.{k}: {before.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
          for k in sorted(before.keys() | now.keys()) if k.startswith(tuple(prefixes)) and before.get(k) != now.get(k)]


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """A validated config as the typed sections the library takes."""
  seed: int
  model: ModelSource
  data: DataSource
  trainer: TrainerSettings
  batch: BatchSpec
  checkpoint: checkpoint.CheckpointSettings
  log: LogSettings


def trainer_settings(config: ml_collections.ConfigDict) -> TrainerSettings:
  """The step's settings: `config.train` and `config.optim` (the only sections the step reads)."""
  t = config.train
  objective = Objective(group_size=int(t.group_size), tau=float(t.tau), w_ctr=float(t.w_ctr), w_gen=float(t.w_gen),
                        w_distill=float(t.w_distill), accum_steps=int(t.grad_accum_steps),
                        gradcache_chunk=int(t.gradcache_chunk), lm_loss_chunk=int(t.lm_loss_chunk))
  if t.finetune not in ("full", "lora"):
    raise ConfigError(f"config.train.finetune={t.finetune!r}; expected 'full' or 'lora'")
  selection = Selection(lora=lora.LoraConfig.from_mapping(t.lora) if t.finetune == "lora" else None,
                        train_embeddings=bool(t.train_embeddings), train_special_tokens=bool(t.train_special_tokens))
  return TrainerSettings(steps=int(t.steps), objective=objective, selection=selection,
                         optim=optim.OptimConfig.from_mapping(config.optim))


def settings(config: ml_collections.ConfigDict) -> RunSettings:
  """The typed sections of a config that `validate` accepted."""
  t, d = config.train, config.data
  data = DataSource(kind=d.kind, train_files=tuple(d.train_files), skip_bad=bool(d.skip_bad),
                    synthetic=SyntheticSpec(**d.synthetic))
  batch = BatchSpec(int(t.batch_queries), int(t.group_size), templates.Lengths(**t.lengths), float(t.thought_drop),
                    int(d.shuffle_seed), teacher_scores=t.w_distill > 0, skip_bad=bool(d.skip_bad))
  c, log = config.checkpoint, config.log
  return RunSettings(
      seed=int(config.seed),
      model=ModelSource(config.model.source, config.model.path, model_config(config, vocab_size=0)),
      data=data, trainer=trainer_settings(config), batch=batch,
      checkpoint=checkpoint.CheckpointSettings(c.dir, int(c.every), int(c.keep), bool(c.async_save),
                                               bool(c.fallback)),
      log=LogSettings(int(log.every), log.tensorboard_dir, log.jsonl))
