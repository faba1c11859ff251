#!/usr/bin/env bash
# The README's results, end to end on one CPU machine: SmolLM2-135M thinks, trains and retrieves on SciFact.
#
#   launch/scifact.sh [--shared=../shared] [--out=runs/scifact] [--limit=N] [--shards=8] [--steps=N]
#                     [--max_queries=N] [--dataset=DIR] [--dry-run] [-- TRAINER_OVERRIDES...]
#
# Stages, each a documented CLI of its own (the commands are printed as they run):
#   thoughts   data_tools.synthesize: SmolLM2-135M-Instruct writes k=2 thoughts per SciFact train query (zero-shot:
#              in-context examples would double every prompt, and prefill is half the time), a BM25 +
#              all-MiniLM-L6-v2 committee picks one, BM25 mines 7 hard negatives; 8 TFRecord shards.
#   convert    o1jax.convert: the GGUF weights as a Hugging Face directory (the untrained model).
#   untrained  o1jax.eval on SciFact test: the untrained model (GGUF weights, special tokens at the vocabulary
#              mean) without thinking, BM25 and MiniLM.
#   train      o1jax.train with configs/smollm2_135m_scifact.py on those shards.
#   trained    o1jax.eval: the trained model with 3 thoughts per query and without thinking.
#   report     launch.report: OUT/results.md (the table) and OUT/results.png (curves and nDCG@10 bars).
# A finished stage leaves OUT/stages/NAME.seconds (its wall time) and is skipped when the script is run again;
# an interrupted one resumes: synthesis keeps whole shards, training restores its last checkpoint, and document
# embeddings are cached. --limit (train queries), --shards (each shard's last generation batch is padded to 64
# prompts), --steps and --max_queries (test queries) make a quick run;
# --dataset replaces the SciFact directory (BEIR layout with train and test qrels); arguments after `--` go to
# the trainer (e.g. --config.train.batch_queries=8). Run it from the repository root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

shared=../shared out=runs/scifact limit="" shards=8 steps="" max_queries=0 dataset=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --shared=*) shared="${1#*=}" ;;
    --out=*) out="${1#*=}" ;;
    --limit=*) limit="${1#*=}" ;;
    --shards=*) shards="${1#*=}" ;;
    --steps=*) steps="${1#*=}" ;;
    --max_queries=*) max_queries="${1#*=}" ;;
    --dataset=*) dataset="${1#*=}" ;;
    --dry-run) export O1_DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "scifact.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
dataset="${dataset:-$shared/data/beir-scifact}"
gguf="$shared/data/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
for path in "$dataset/qrels/train.tsv" "$dataset/qrels/test.tsv" "$gguf"; do
  [[ -f "$path" ]] || { echo "scifact.sh: $path not found (give --shared=DIR, the folder holding data/)" >&2; exit 2; }
done
# The whole recipe runs on the CPU; without this, jax would first probe for a TPU (libtpu is a test requirement).
export JAX_PLATFORMS=cpu
mkdir -p "$out/stages"

# Runs stage $1 (the command "${@:2}") unless it finished before; records its wall time.
stage() {
  local name="$1" start
  shift
  if [[ -f "$out/stages/$name.seconds" ]]; then
    echo "== $name: done in an earlier run ($(cat "$out/stages/$name.seconds") s), skipped" >&2
    return
  fi
  echo "== $name" >&2
  start=$(date +%s)
  o1_run "$@"
  [[ "${O1_DRY_RUN:-0}" == 1 ]] || echo "$(( $(date +%s) - start ))" > "$out/stages/$name.seconds"
}

# Document truncation for every o1jax row: 64 tokens keep the title and the first sentences of an abstract and
# make a full-corpus embedding about 10 minutes here (METHOD's 512 would take over an hour per model).
eval_args=(--dataset="$dataset" --split=test --doc_tokens=64 --max_queries="$max_queries")

stage thoughts python -m data_tools.synthesize --dataset="$dataset" --split=train --out="$out/thoughts" \
  --num_shards="$shards" --expert=local --model="$gguf" --members=bm25,st --k=2 --num_examples=0 \
  --max_new_tokens=40 --batch_size=64 --queries_per_batch=32 --num_negatives=7 \
  ${limit:+--limit="$limit"}

stage convert python -m o1jax.convert gguf-to-hf --gguf="$gguf" --out="$out/untrained_hf" --overwrite
stage untrained python -m o1jax.eval --checkpoint="$out/untrained_hf" --think=off --baselines=bm25,minilm \
  --out="$out/eval/untrained" "${eval_args[@]}"

stage train python -m o1jax.train --config="$O1_LAUNCH_DIR/../configs/smollm2_135m_scifact.py" \
  --config.model.path="$gguf" --config.data.train_files="('$out/thoughts/train-*.tfrecord',)" \
  --config.checkpoint.dir="$out/train" --config.log.jsonl="$out/train_metrics.jsonl" \
  --config.log.tensorboard_dir="$out/tensorboard" ${steps:+--config.train.steps="$steps"} "$@"

stage trained python -m o1jax.eval --checkpoint="$out/train" --think=3 --max_new_tokens=40 --baselines= \
  --out="$out/eval/trained" "${eval_args[@]}"

# Thinking against no thinking on the same checkpoint, query by query (paired tests; the figures the README quotes).
o1_run python -m o1jax.eval.compare "$out/eval/trained/o1jax_think_3.trec" "$out/eval/trained/o1jax_no-think.trec" \
  --qrels="$dataset/qrels/test.tsv" --names=think=3,no-think --json="$out/eval/trained/compare.json"
o1_run python -m launch.report --run="$out"
