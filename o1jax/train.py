"""`python -m o1jax.train --config=configs/X.py[:variant] [--config.a.b=v ...]`: the O1 Embedder trainer.

Validates the config, takes the checkpoint directory's lock (a second trainer on it is refused), builds model +
tokenizer + batches, resumes from the latest checkpoint in config.checkpoint.dir when there is one (params,
optimizer state, step, PRNG and data position), then runs the jitted step, saving every `checkpoint.every` steps
and when any process gets SIGTERM/SIGINT (every process then saves the same step and exits:
`training.preemption`). Once the state is restored or initialised, the checkpoint directory also gets the config,
model config and tokenizer (`checkpoint.save_run_files`), so export and evaluation need nothing else. With
`eval.every` > 0, retrieval metrics on the dev set of `config.eval` are logged with the training metrics every N
steps and at the end.

Faults end the run with one line naming the file, record, step or config key, and exit status 1:
  * a non-finite loss or gradient norm (checked before every save, log line and evaluation): nothing is saved
    after the last finite step (`training.divergence`);
  * a checkpoint saved with another state shape (the config keys that changed are named), another batch size or
    shuffle seed, or other training records; a corrupt or partial latest step (`config.checkpoint.fallback`
    resumes from the one before);
  * a training record that cannot be read or batched: with one process, the state reached so far is saved first,
    so a rerun with `config.data.skip_bad` resumes at the same example.
"""
from __future__ import annotations

from o1jax import host_allocator

if __name__ == "__main__":  # before jax and TensorFlow start their threads and allocate
  host_allocator.reexec_on_cpu()

import contextlib
import logging
import sys
from typing import Any

import jax
import ml_collections

from o1jax import checkpoint, config as o1config, sharding
from o1jax.data import batching, pipeline, tfrecord
from o1jax.eval.during_training import DevEvaluator, EvalSettings
from o1jax.training import divergence, logger, preemption, sources
from o1jax.training.flops import peak_flops
from o1jax.training.trainer import Trainer


class BadRecordStop(RuntimeError):
  """A training record that cannot be read or batched stopped the run; says how to go on."""


# Errors that are the input's or the run's, not the program's: the CLI prints their one-line message.
USER_ERRORS = (o1config.ConfigError, checkpoint.CheckpointError, divergence.Diverged, BadRecordStop,
               pipeline.ManifestError, tfrecord.TFRecordError, batching.RecordError, OSError)
_BAD_RECORD = (tfrecord.TFRecordError, batching.RecordError)
# What a saved data position means besides the batch index: resuming under other values would not continue at
# the same example. (Checkpoints written before a key existed lack it, and are not checked for it.)
_POSITION_KEYS = {"records": "config.data (the training records)", "batch_queries": "config.train.batch_queries",
                  "shuffle_seed": "config.data.shuffle_seed"}


def _position(run: o1config.RunSettings, records: Any) -> dict[str, int]:
  return {"records": len(records), "batch_queries": run.batch.batch_queries, "shuffle_seed": run.batch.seed}


def _check_position(directory: str, step: int, saved: dict[str, Any], now: dict[str, int]) -> None:
  changed = sorted(key for key in _POSITION_KEYS.keys() & saved.keys() if saved[key] != now[key])
  if changed:
    raise checkpoint.CheckpointError(
        f"{directory}/{step}: {'; '.join(f'{k} saved {saved[k]}, now {now[k]}' for k in changed)}: resuming would "
        f"not continue at the same example. Resume with the values it was saved with "
        f"({', '.join(_POSITION_KEYS[k] for k in changed)}), or train into another config.checkpoint.dir")


def _restore(ckpt: checkpoint.Checkpointer, trainer: Trainer, config: ml_collections.ConfigDict,
             fallback: bool) -> tuple[int, Any, dict[str, Any]] | None:
  try:
    return ckpt.restore_latest(trainer.abstract_state_with_shardings(), fallback)
  except checkpoint.StateMismatch as e:
    saved = checkpoint.load_run_config(ckpt.directory)
    changed = o1config.changed_keys(saved, config, o1config.STATE_KEYS) if saved else []
    cause = (f"config keys changed since: {'; '.join(changed)}" if changed else
             f"no config key that shapes the state changed since {ckpt.directory}/{checkpoint.RUN_DIR}: did the "
             "model at config.model.path change?")
    raise checkpoint.CheckpointError(f"{e}; {cause}. Resume with the values it was saved with, or train into "
                                     "another config.checkpoint.dir") from e


def main(argv: list[str]) -> list[dict[str, float]]:
  """Trains; returns the logged metrics history (process 0)."""
  config = o1config.load(argv)
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(preemption.stop_signals())  # joins the processes; a signal from here on stops
    o1config.validate(config, jax.device_count())
    run = o1config.settings(config)
    if run.checkpoint.dir:
      stack.enter_context(checkpoint.exclusive(run.checkpoint.dir))
    return _train(config, run, stop)


def _train(config: ml_collections.ConfigDict, run: o1config.RunSettings,
           stop: preemption.StopAgreement) -> list[dict[str, float]]:
  mesh = sharding.make_mesh(config.mesh)
  logging.info("devices: %d x %s; host allocator: %s", jax.device_count(), jax.default_backend(),
               host_allocator.active())
  model_cfg, params, tokenizer, special = sources.build_model(run.model, run.data, mesh)
  records = sources.load_records(run.data, jax.process_index(), jax.process_count())
  batcher = batching.Batcher(records, tokenizer, special, run.batch, jax.process_index(), jax.process_count())
  trainer = Trainer(model_cfg, run.trainer, mesh, special)
  eval_settings = EvalSettings.from_config(config.eval)
  evaluate = DevEvaluator(eval_settings, model_cfg, tokenizer, mesh, run.seed) if eval_settings.every else None
  position = _position(run, records)

  ckpt, restored = None, None
  if run.checkpoint.dir:
    ckpt = checkpoint.Checkpointer(run.checkpoint.dir, run.checkpoint.every, run.checkpoint.keep,
                                   run.checkpoint.async_save)
    restored = _restore(ckpt, trainer, config, run.checkpoint.fallback)
  if restored is None:
    state, next_batch = trainer.init_state(jax.random.key(run.seed), params), 0
  else:
    step, state, data = restored
    _check_position(ckpt.directory, step, data, position)
    next_batch = data["next_batch"]
    logging.info("resumed from %s step %d", ckpt.directory, step)
  if ckpt is not None and jax.process_index() == 0:
    checkpoint.save_run_files(run.checkpoint.dir, config, model_cfg, tokenizer)
  del params
  start, steps = int(state["step"]), run.trainer.steps

  shape = run.batch.shape()
  log = logger.TrainLogger(steps, start, run.log, tokens_per_step=shape.tokens(),
                           flops_per_step=trainer.flops_per_step(shape), peak_flops=peak_flops(model_cfg.dtype),
                           enabled=jax.process_index() == 0)
  guard = divergence.DivergenceGuard()
  batches = batching.Prefetcher(batcher, next_batch)
  try:
    for step in range(start, steps):
      try:
        batch = next(batches)
      except _BAD_RECORD as e:
        raise _stop_at_bad_record(e, ckpt, guard, step, start, state, {"next_batch": next_batch, **position}) from e
      state, metrics = trainer.step(state, trainer.shard_batch(batch))
      next_batch += 1
      done, last = step + 1, step + 1 == steps
      stopping = stop.reached(done, metrics["loss"])
      guard.observe(done, metrics)
      evaluating = evaluate is not None and (done % eval_settings.every == 0 or last)
      if evaluating or last or stopping or done % run.log.every == 0 or (ckpt is not None and ckpt.due(done)):
        guard.check()
      if evaluating:
        metrics = {**metrics, **evaluate(trainer.inference_params(state))}
      log.log(done, metrics)
      if ckpt is not None:
        try:
          ckpt.save(done, state, {"next_batch": next_batch, **position}, force=last or stopping)
        except checkpoint.NonFiniteState as e:  # finite loss and gradients, but not the updated state
          raise divergence.Diverged(done, e.problem) from e
      if stopping:
        logging.warning("%s at step %d: saved a checkpoint, exiting", stop.reason, done)
        break
  finally:
    batches.close()
    log.close()
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()
  return log.history


def _stop_at_bad_record(error: Exception, ckpt: checkpoint.Checkpointer | None,
                        guard: divergence.DivergenceGuard, step: int, start: int, state: Any,
                        data: dict[str, Any]) -> BadRecordStop:
  """The error to stop with at a record that cannot be used, once the state reached so far is saved (with one
  process only: a save is collective, and the other processes, which read other rows, are inside the next step)."""
  saved = ""
  if ckpt is not None and step > start and jax.process_count() == 1:  # at `start` the state is the restored one
    guard.check()
    ckpt.wait()
    if step not in ckpt.all_steps():
      ckpt.save(step, state, data, force=True)
    saved = f" The state after step {step} is saved."
  return BadRecordStop(f"{error}.{saved} Rerun with --config.data.skip_bad=True to put the next usable record in "
                       "its place and resume at the same example")


def cli() -> None:
  """`python -m o1jax.train` and the `o1jax-train` command: one line and exit 1 on bad input or a fault."""
  host_allocator.reexec_on_cpu()  # the o1jax-train command (`python -m` re-executed at the top already)
  logging.getLogger().setLevel(logging.INFO)  # absl's handler is already installed; just let INFO through
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO through absl's logger
  try:
    main(sys.argv[1:])
  except USER_ERRORS as e:
    sys.exit(str(e))


if __name__ == "__main__":
  cli()
