"""`python -m o1jax.train --config=configs/X.py[:variant] [--config.a.b=v ...]`: the O1 Embedder trainer.

Validates the config, builds model + tokenizer + batches, resumes from the latest checkpoint in
config.checkpoint.dir when there is one (params, optimizer state, step, PRNG and data position), then runs the
jitted step, saving every `checkpoint.every` steps and on SIGTERM/SIGINT. The checkpoint directory also gets the
config, model config and tokenizer (`checkpoint.save_run_files`), so export and evaluation need nothing else.
With `eval.every` > 0, retrieval metrics on the dev set of `config.eval` are logged with the training metrics
every N steps and at the end.
"""
from __future__ import annotations

from collections.abc import Sequence
import logging
import sys
from typing import Any

import jax

from o1jax import checkpoint, config as o1config, metrics_log, sharding, templates
from o1jax.convert import load_gguf, load_hf
from o1jax.data import batching, pipeline, synthetic
from o1jax.eval.dev import DevEvaluator
from o1jax.tokenizer import SpecialIds, add_special_tokens, load_tokenizer
from o1jax.train_step import Trainer


def build_model(config) -> tuple[Any, Any, Any, SpecialIds]:
  """(ModelConfig, host params or None for random init, tokenizer, SpecialIds) of config.model."""
  m = config.model
  if m.source == "random":
    tokenizer = synthetic.make_tokenizer(synthetic.SyntheticSpec(**config.data.synthetic))
    return o1config.model_config(config, len(tokenizer)), None, tokenizer, SpecialIds.from_tokenizer(tokenizer)
  runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy)
  model_cfg, params = (load_hf if m.source == "hf" else load_gguf)(m.path, **runtime)
  tokenizer = load_tokenizer(m.path)
  model_cfg, params, special = add_special_tokens(tokenizer, model_cfg, params)
  return model_cfg, params, tokenizer, special


def load_records(config) -> Sequence[dict]:
  """The training records: generated, or indexed TFRecord shards read on demand (globs or manifest.json)."""
  if config.data.kind == "synthetic":
    return synthetic.make_records(synthetic.SyntheticSpec(**config.data.synthetic))
  source = pipeline.open_source(config.data.train_files, skip_bad=config.data.skip_bad,
                                process_index=jax.process_index(), process_count=jax.process_count())
  for skipped in source.skipped:
    logging.warning("skipped a bad training record: %s", skipped)
  return source


def main(argv: list[str]) -> list[dict[str, float]]:
  """Trains; returns the logged metrics history (process 0)."""
  config = o1config.load(argv)
  sharding.initialize_distributed()
  o1config.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  model_cfg, params, tokenizer, special = build_model(config)
  records = load_records(config)
  t = config.train
  spec = batching.BatchSpec(t.batch_queries, t.group_size, templates.Lengths(**t.lengths), t.thought_drop,
                            config.data.shuffle_seed, teacher_scores=t.w_distill > 0)
  batcher = batching.Batcher(records, tokenizer, special, spec, jax.process_index(), jax.process_count())
  trainer = Trainer(model_cfg, config, mesh, special)
  evaluate = (DevEvaluator(config.eval, model_cfg, tokenizer, mesh, trainer.lora_cfg, config.seed)
              if config.eval.every else None)

  ckpt = None
  latest = None
  if config.checkpoint.dir:
    ckpt = checkpoint.Checkpointer(config.checkpoint.dir, config.checkpoint.every, config.checkpoint.keep,
                                   config.checkpoint.async_save)
    latest = ckpt.latest_step()
    if jax.process_index() == 0:
      checkpoint.save_run_files(config.checkpoint.dir, config, model_cfg, tokenizer)
  if latest is None:
    state, next_batch = trainer.init_state(jax.random.key(config.seed), params), 0
  else:
    state, data = ckpt.restore(latest, checkpoint.abstract_like(trainer.abstract_state, trainer.state_shardings))
    if data["records"] != len(records):
      raise ValueError(f"{ckpt.directory}/{latest}: saved with {data['records']} training records, the data now "
                       f"has {len(records)}; resuming would not continue at the same example")
    next_batch = data["next_batch"]
    logging.info("resumed from %s step %d", ckpt.directory, latest)
  del params
  start = int(state["step"])

  first = batcher.batch(next_batch)
  shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in first.items()}
  log = metrics_log.MetricsLog(
      t.steps, start, config.log.every, config.log.tensorboard_dir,
      tokens_per_step=sum(s[0] * s[1] for k, s in shapes.items() if k.endswith("_ids")),
      flops_per_step=trainer.flops_per_step(shapes), peak_flops=metrics_log.peak_flops(),
      jsonl=config.log.jsonl, enabled=jax.process_index() == 0)
  batches = batching.Prefetcher(batcher, next_batch)
  try:
    with checkpoint.catch_stop_signals() as stop:
      for step in range(start, t.steps):
        state, metrics = trainer.step(state, trainer.shard_batch(next(batches)))
        next_batch += 1
        last = step + 1 == t.steps
        if evaluate is not None and ((step + 1) % config.eval.every == 0 or last):
          metrics = {**metrics, **evaluate(state)}
        log.log(step + 1, metrics)
        if ckpt is not None:
          ckpt.save(step + 1, state, {"next_batch": next_batch, "records": len(records)}, force=last or bool(stop))
        if stop:
          logging.warning("%s at step %d: saved a checkpoint, exiting", stop.signal_name, step + 1)
          break
  finally:
    batches.close()
    log.close()
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()
  return log.history


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)  # absl's handler is already installed; just let INFO through
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO through absl's logger
  try:
    main(sys.argv[1:])
  except o1config.ConfigError as e:
    sys.exit(str(e))
