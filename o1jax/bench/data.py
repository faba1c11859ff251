"""Data benchmark: committee scoring throughput, shard read/decode rates, and the input pipeline vs the step.

  python -m o1jax.bench data --dataset=$O1JAX_SHARED/data/beir-scifact [--num_queries=200] [--k=3] [--gguf=FILE]
      [--json=PATH]

Candidate "thoughts" are real SciFact passages clipped to 48 words (the length of a generated thought), so
member costs are realistic; no expert is run. The input pipeline (index the shards, read + CRC + decode each
record, sample the group, template, tokenize, pad, with the background prefetcher) is timed from opening the
files to the last batch, for tiny_cpu (synthetic records in shards, its word-level tokenizer) and smollm2_135m
(SciFact records, the SmolLM2 tokenizer; needs --gguf or O1JAX_SHARED), against the examples/s the training
step of the same config consumes (`Trainer.step`, median of timed steps after compiling). Goal: >= 10x.
All rates are measured in the same run (one process, each timed once: no A/B protocol) and printed with ratios;
`--json=PATH` also writes them with the machine record.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from data_tools import inputs
from data_tools.committee import BM25Member, Committee, sentence_transformer_member
from data_tools.record import ThoughtRecord, read_shard
from o1jax import config as o1config, sharding, templates
from o1jax.bench import protocol
from o1jax.data import batching, pipeline, readers, synthetic, tfrecord
from o1jax.training import sources
from o1jax.training.trainer import Trainer

_SHARDS = 4


def _rate(fn, count: int) -> float:
  start = time.perf_counter()
  fn()
  return count / (time.perf_counter() - start)


def _write_shards(directory: pathlib.Path, records: list[ThoughtRecord]) -> str:
  """`records` round-robin into _SHARDS shards; returns their glob pattern."""
  writers = [tfrecord.TFRecordWriter(directory / f"train-{s:05d}-of-{_SHARDS:05d}.tfrecord") for s in range(_SHARDS)]
  for n, record in enumerate(records):
    writers[n % _SHARDS].write(record.to_example())
  for w in writers:
    w.close()
  return str(directory / "train-*.tfrecord")


def _synthetic_records(count: int) -> list[ThoughtRecord]:
  """The tiny_cpu world's records, cycled to `count` with distinct ids, in the synthesize layout."""
  base = synthetic.make_records(synthetic.SyntheticSpec())
  records = []
  for n in range(count):
    r = base[n % len(base)]
    records.append(ThoughtRecord(
        query_id=f"{r['query_id']}-{n}", query=r["query"], thoughts=(r["thought"],), chosen=0,
        positives=tuple(r["positives"]), negatives=tuple(r["negatives"]), positive_ids=(), negative_ids=(),
        committee_members=("bm25",), committee_weights=np.ones(1, np.float32), committee_scores=np.zeros((1, 1)),
        vote="soft", vote_totals=np.zeros(1, np.float32)))
  return records


def pipeline_vs_step(name: str, overrides: list[str], pattern: str, batches: int, steps: int) -> dict:
  """Examples/s of the full input pipeline from `pattern` and of config `name`'s training step; their ratio."""
  config = o1config.load([f"--config=configs/{name}.py", "--config.checkpoint.dir=", *overrides])
  o1config.validate(config, jax.device_count())
  run = o1config.settings(config)
  model_cfg, params, tokenizer, special = sources.build_model(run.model, run.data)
  spec = run.batch

  start = time.perf_counter()
  source = pipeline.open_source([pattern])
  batcher = batching.Batcher(source, tokenizer, special, spec)
  prefetch = batching.Prefetcher(batcher, 0)
  host = [next(prefetch) for _ in range(batches)][0]
  input_rate = batches * spec.batch_queries / (time.perf_counter() - start)
  prefetch.close()
  source.close()

  trainer = Trainer(model_cfg, run.trainer, sharding.make_mesh(config.mesh), special)
  holder = {"state": trainer.init_state(jax.random.key(run.seed), params)}
  batch = trainer.shard_batch(host)

  def step() -> float:
    begin = time.perf_counter()
    holder["state"], metrics = trainer.step(holder["state"], batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - begin

  step()  # compile
  step_rate = spec.batch_queries / float(np.median([step() for _ in range(steps)]))
  print(f"[{name}] input pipeline ({len(source)} records in {_SHARDS} shards, index + read + decode + template + "
        f"tokenize + pad, prefetched): {input_rate:,.0f} examples/s; training step consumes {step_rate:,.1f} "
        f"examples/s ({spec.batch_queries} queries x {spec.group_size} passages); ratio {input_rate / step_rate:,.1f}x "
        f"(goal >= 10x)")
  return {"records": len(source), "input_examples_per_s": input_rate, "step_examples_per_s": step_rate,
          "ratio": input_rate / step_rate}


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m o1jax.bench data")
  p.add_argument("--dataset", required=True, help="BEIR directory, e.g. shared/data/beir-scifact")
  p.add_argument("--num_queries", type=int, default=200)
  p.add_argument("--k", type=int, default=3)
  p.add_argument("--num_records", type=int, default=5000, help="records in the shards that are read back")
  p.add_argument("--batches", type=int, default=200, help="batches drawn from the input pipeline")
  p.add_argument("--steps", type=int, default=3, help="timed training steps per config (median)")
  p.add_argument("--gguf", default="", help="SmolLM2-135M-Instruct GGUF file (default: from O1JAX_SHARED)")
  p.add_argument("--json", default="", help="write every rate and the machine here")
  args = p.parse_args(argv)

  beir = readers.load_beir(args.dataset, "train")
  queries = [q for q in inputs.from_beir(beir) if q.positives][:args.num_queries]
  docs = [templates.document_text(d.title, d.text) for d in beir.corpus.values()]
  rng = np.random.default_rng(0)
  candidates = [[" ".join(docs[i].split()[:48]) for i in rng.choice(len(docs), args.k, replace=False)]
                for _ in queries]
  positives = [q.positives[0] for q in queries]
  n = len(queries)

  bm25, minilm = BM25Member(), sentence_transformer_member()
  minilm.score(positives[:4], candidates[:4])  # model warm-up outside the timing
  bm25_rate = _rate(lambda: bm25.score(positives, candidates), n)
  minilm_rate = _rate(lambda: minilm.score(positives, candidates), n)
  committee = Committee([bm25, minilm])
  verdicts = []
  committee_rate = _rate(lambda: verdicts.extend(committee.judge(positives, candidates)), n)

  scifact = []
  for i in range(args.num_records):
    q, v = queries[i % n], verdicts[i % n]
    scifact.append(ThoughtRecord(
        query_id=f"{q.query_id}-{i}", query=q.query, thoughts=tuple(candidates[i % n]), chosen=v.winner,
        positives=q.positives, negatives=tuple(docs[:15]), positive_ids=q.positive_ids, negative_ids=(),
        committee_members=tuple(committee.names), committee_weights=committee.weights, committee_scores=v.scores,
        vote="soft", vote_totals=v.totals))
  print(f"committee scoring ({n} queries x k={args.k}): bm25 {bm25_rate:.1f} q/s, MiniLM {minilm_rate:.1f} q/s, "
        f"full committee + soft vote {committee_rate:.1f} q/s")
  with tempfile.TemporaryDirectory() as tmp:
    scifact_dir, synthetic_dir = pathlib.Path(tmp) / "scifact", pathlib.Path(tmp) / "synthetic"
    scifact_dir.mkdir()
    synthetic_dir.mkdir()
    scifact_pattern = _write_shards(scifact_dir, scifact)
    paths = sorted(scifact_dir.glob("train-*.tfrecord"))
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    frame_rate = _rate(lambda: [tfrecord.count_records(p) for p in paths], args.num_records)
    decode_rate = _rate(lambda: [read_shard(p) for p in paths], args.num_records)
    index_rate = _rate(lambda: pipeline.open_source([scifact_pattern]).close(), args.num_records)
    print(f"shard read ({args.num_records} records, {size_mb:.1f} MB, 15 negatives each): framing+CRC "
          f"{frame_rate:.0f} rec/s ({frame_rate * size_mb / args.num_records:.1f} MB/s), read+decode to records "
          f"{decode_rate:.0f} rec/s, header-only index {index_rate:,.0f} rec/s")
    print(f"ratios: read+decode / committee = {decode_rate / committee_rate:.0f}x; "
          f"BM25 / MiniLM member speed = {bm25_rate / minilm_rate:.0f}x")

    synthetic_pattern = _write_shards(synthetic_dir, _synthetic_records(args.num_records))
    pipelines = {"tiny_cpu": pipeline_vs_step("tiny_cpu", [], synthetic_pattern, args.batches, args.steps)}
    shared = os.environ.get("O1JAX_SHARED")
    gguf = args.gguf or (os.path.join(shared, "data", "smollm2-135m-instruct-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
                         if shared else "")
    if gguf:
      pipelines["smollm2_135m"] = pipeline_vs_step("smollm2_135m", [f"--config.model.path={gguf}"], scifact_pattern,
                                                   args.batches, args.steps)
    else:
      print("smollm2_135m skipped: pass --gguf=FILE or set O1JAX_SHARED")
  if args.json:
    protocol.write_json(args.json, "data", {
        "settings": {k: getattr(args, k) for k in ("num_queries", "k", "num_records", "batches", "steps")},
        "committee_queries_per_s": {"bm25": bm25_rate, "minilm": minilm_rate, "committee": committee_rate},
        "shards_records_per_s": {"framing_crc": frame_rate, "read_decode": decode_rate, "index": index_rate},
        "shards_mb": size_mb, "pipeline": pipelines})
