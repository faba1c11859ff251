"""`python -m o1jax.train --config=configs/X.py[:variant] [--config.a.b=v ...]`: the O1 Embedder trainer.

Validates the config, builds model + tokenizer + batches, resumes from the latest checkpoint in
config.checkpoint.dir when there is one (params, optimizer state, step, PRNG and data position), then runs the
jitted step, saving every `checkpoint.every` steps and on SIGTERM/SIGINT. The checkpoint directory also gets the
config, model config and tokenizer (`checkpoint.save_run_files`), so export and evaluation need nothing else.
With `eval.every` > 0, retrieval metrics on the dev set of `config.eval` are logged with the training metrics
every N steps and at the end.
"""
from __future__ import annotations

import logging
import sys

import jax

from o1jax import checkpoint, config as o1config, sharding
from o1jax.data import batching
from o1jax.eval.during_training import DevEvaluator, EvalSettings
from o1jax.training import logger, sources
from o1jax.training.flops import peak_flops
from o1jax.training.trainer import Trainer


def main(argv: list[str]) -> list[dict[str, float]]:
  """Trains; returns the logged metrics history (process 0)."""
  config = o1config.load(argv)
  sharding.initialize_distributed()
  o1config.validate(config, jax.device_count())
  run = o1config.settings(config)
  mesh = sharding.make_mesh(config.mesh)
  model_cfg, params, tokenizer, special = sources.build_model(run.model, run.data)
  records = sources.load_records(run.data, jax.process_index(), jax.process_count())
  batcher = batching.Batcher(records, tokenizer, special, run.batch, jax.process_index(), jax.process_count())
  trainer = Trainer(model_cfg, run.trainer, mesh, special)
  eval_settings = EvalSettings.from_config(config.eval)
  evaluate = DevEvaluator(eval_settings, model_cfg, tokenizer, mesh, run.seed) if eval_settings.every else None

  ckpt, latest = None, None
  if run.checkpoint.dir:
    ckpt = checkpoint.Checkpointer(run.checkpoint.dir, run.checkpoint.every, run.checkpoint.keep,
                                   run.checkpoint.async_save)
    latest = ckpt.latest_step()
    if jax.process_index() == 0:
      checkpoint.save_run_files(run.checkpoint.dir, config, model_cfg, tokenizer)
  if latest is None:
    state, next_batch = trainer.init_state(jax.random.key(run.seed), params), 0
  else:
    state, data = ckpt.restore(latest, trainer.abstract_state_with_shardings())
    if data["records"] != len(records):
      raise ValueError(f"{ckpt.directory}/{latest}: saved with {data['records']} training records, the data now "
                       f"has {len(records)}; resuming would not continue at the same example")
    next_batch = data["next_batch"]
    logging.info("resumed from %s step %d", ckpt.directory, latest)
  del params
  start, steps = int(state["step"]), run.trainer.steps

  shape = run.batch.shape()
  log = logger.TrainLogger(steps, start, run.log, tokens_per_step=shape.tokens(),
                           flops_per_step=trainer.flops_per_step(shape), peak_flops=peak_flops(),
                           enabled=jax.process_index() == 0)
  batches = batching.Prefetcher(batcher, next_batch)
  try:
    with checkpoint.catch_stop_signals() as stop:
      for step in range(start, steps):
        state, metrics = trainer.step(state, trainer.shard_batch(next(batches)))
        next_batch += 1
        last = step + 1 == steps
        if evaluate is not None and ((step + 1) % eval_settings.every == 0 or last):
          metrics = {**metrics, **evaluate(trainer.inference_params(state))}
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
