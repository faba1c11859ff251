#!/usr/bin/env bash
# The thinking ablation on one BEIR-layout dataset, end to end on one CPU machine: SmolLM2-135M thinks, trains and
# retrieves, and the same model trained without thoughts shows what the thoughts add.
#
#   launch/recipe.sh [--preset=scifact|cosqa|scifact-gpu] [--shared=../shared] [--out=runs/PRESET] [--dataset=DIR]
#                    [--train_split=NAME] [--test_split=NAME] [--doc_tokens=N] [--limit=N] [--shards=8] [--steps=N]
#                    [--max_queries=N] [--examples=N] [--candidates=K] [--thought_tokens=N] [--thought_drop=R]
#                    [--w_gen=W] [--seed=N] [--contrastive_seed=N] [--dtype=float32|bfloat16] [--reuse=RUN]
#                    [--dry-run]
#                    [-- TRAINER_OVERRIDES...]
#
# Presets (the options above override them):
#   scifact  SHARED/data/beir-scifact: qrels/train.tsv (809 queries) trains, qrels/test.tsv (300) evaluates;
#            documents cut to 64 tokens (title and first sentences of an abstract). launch/scifact.sh runs this.
#   cosqa    SHARED/data/cosqa-retrieval (6,267 Python functions): qrels/dev.tsv (500 queries) trains,
#            qrels/test.tsv (500) evaluates; documents cut to 128 tokens, which keep 94% of the functions whole
#            (median 65 SmolLM2 tokens: 64 would cut half of them, and with them the identifiers in their bodies).
#   scifact-gpu  SciFact at METHOD's lengths, meant for one GPU (the platform jax finds; the others run on the CPU):
#            the expert writes k=3 thoughts of up to 128 tokens, each prompt with 3 in-context (query, positive)
#            pairs of other train queries, 15 hard negatives a query; configs/smollm2_135m_scifact.py:gpu trains
#            3 epochs with query + thought 256 and documents 192 tokens; evaluation thinks up to 128 tokens and cuts
#            documents at 512 (--doc_tokens sets the evaluation's cut only).
#
# Stages, each a documented CLI of its own (the commands are printed as they run):
#   thoughts     data_tools.synthesize: SmolLM2-135M-Instruct writes k=2 thoughts of up to 40 tokens per train
#                query (zero-shot: in-context examples would double every prompt, and prefill is half the time), a
#                BM25 + all-MiniLM-L6-v2 committee picks one, BM25 mines 7 hard negatives; 8 TFRecord shards.
#   convert      o1jax.convert: the GGUF weights as a Hugging Face directory (the untrained model).
#   untrained    o1jax.eval on the test split: the untrained model (GGUF weights, special tokens at the vocabulary
#                mean) without thinking, BM25 and MiniLM.                                              (c)
#   train        o1jax.train with configs/smollm2_135m_scifact.py on those shards: contrastive + behaviour cloning.
#   trained      o1jax.eval: that model with 3 thoughts per query and without thinking.                (a)
#   train_contrastive  the same config, shards and steps with w_gen=0 and thought_drop=1: every query is trained
#                in its thought-dropped form and no loss is put on thoughts (contrastive only).
#   contrastive  o1jax.eval: that model without thinking (it never learnt to think).                   (b)
#   diagnose     data_tools.diagnose on the test queries: the expert's thoughts (its first candidate; the committee's
#                choice, which saw a relevant document), an oracle thought (a relevant document's first 32 words),
#                and how close each source's thoughts, (a)'s included, come to the relevant documents.
#   diagnosis    o1jax.eval: (a) embedding each query with those thoughts in place of its own.
#   compare      o1jax.eval.compare, query by query on nDCG@10: (a) thinking against (a) without thinking and
#                against (b) (eval/trained/compare-<other>.json); the expert's and the oracle's thoughts against no
#                thinking (eval/diagnosis/compare-<source>-no-think.json). Cheap, so rerun every time.
#   report       launch.report: OUT/results.md (the table and the p-values) and OUT/results.png.
# A finished stage leaves OUT/stages/NAME.seconds (its wall time) and is skipped when the script is run again;
# an interrupted one resumes: synthesis keeps whole shards, training restores its last checkpoint, and document
# embeddings are cached. The expert's levers override the preset's: --examples (in-context (query, positive) pairs
# of other train queries per prompt, in synthesis and in the diagnosis alike), --candidates (k, for the committee to
# choose from), --thought_tokens (the longest thought written, cloned and generated); --thought_drop sets how often
# (a) trains a query without its thought (the config's 0.1 by default; (b) always drops it), --w_gen the weight of
# (a)'s behaviour-cloning loss (the config's 0.2; (b) has none), --seed a replicate of (a): its initialisation and
# data seed (the order, each query's positive, negatives and thought drop) and its thoughts' sampling seed, where
# (b) keeps the config's 0 unless --contrastive_seed sets its own (the same three for (b), which does not think).
# --dtype=bfloat16 computes both trainings (float32
# weights and AdamW) and every evaluation in bfloat16 (on a CPU with avx512_bf16, through XLA:CPU's bfloat16 kernel);
# the expert writes as before. Give a lever run its own --out. OUT/stages/settings
# records what the results depend on, and a run refuses an OUT made with other settings. --reuse=RUN links every
# stage of RUN (made with the same settings but (a)'s and (b)'s levers) whose own settings match: thoughts,
# convert and untrained always; (a)'s train, trained, diagnose and diagnosis when --thought_drop, --w_gen and --seed
# are RUN's; (b)'s train_contrastive and contrastive when --contrastive_seed is. The report names them. A diagnosis
# run anew takes RUN's expert candidates for the test queries instead of generating them.
# --limit (train queries), --shards (each shard's last generation batch is padded to 64 prompts), --steps and
# --max_queries (test queries) make a quick run; --dataset replaces the preset's directory (BEIR layout with
# qrels/TRAIN_SPLIT.tsv and qrels/TEST_SPLIT.tsv); arguments after `--` go to both trainings
# (e.g. --config.train.batch_queries=8). Run it from the repository root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

preset=scifact shared=../shared out="" dataset="" train_split="" test_split="" doc_tokens=""
limit="" shards=8 steps="" max_queries=0 examples_option="" candidates_option="" thought_tokens_option=""
thought_drop="" w_gen="" seed="" contrastive_seed="" dtype="" reuse=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset=*) preset="${1#*=}" ;;
    --shared=*) shared="${1#*=}" ;;
    --out=*) out="${1#*=}" ;;
    --dataset=*) dataset="${1#*=}" ;;
    --train_split=*) train_split="${1#*=}" ;;
    --test_split=*) test_split="${1#*=}" ;;
    --doc_tokens=*) doc_tokens="${1#*=}" ;;
    --limit=*) limit="${1#*=}" ;;
    --shards=*) shards="${1#*=}" ;;
    --steps=*) steps="${1#*=}" ;;
    --max_queries=*) max_queries="${1#*=}" ;;
    --examples=*) examples_option="${1#*=}" ;;
    --candidates=*) candidates_option="${1#*=}" ;;
    --thought_tokens=*) thought_tokens_option="${1#*=}" ;;
    --thought_drop=*) thought_drop="${1#*=}" ;;
    --w_gen=*) w_gen="${1#*=}" ;;
    --seed=*) seed="${1#*=}" ;;
    --contrastive_seed=*) contrastive_seed="${1#*=}" ;;
    --dtype=*) dtype="${1#*=}" ;;
    --reuse=*) reuse="${1#*=}" ;;
    --dry-run) export O1_DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "recipe.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
case "$preset" in
  scifact) preset_dataset=beir-scifact preset_train=train preset_doc_tokens=64 ;;
  cosqa) preset_dataset=cosqa-retrieval preset_train=dev preset_doc_tokens=128 ;;
  scifact-gpu) preset_dataset=beir-scifact preset_train=train preset_doc_tokens=512 ;;
  *) echo "recipe.sh: --preset=$preset: unknown preset (scifact, cosqa, scifact-gpu)" >&2; exit 2 ;;
esac
out="${out:-runs/$preset}"
dataset="${dataset:-$shared/data/$preset_dataset}"
train_split="${train_split:-$preset_train}"
test_split="${test_split:-test}"
doc_tokens="${doc_tokens:-$preset_doc_tokens}"
gguf="$shared/data/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
for path in "$dataset/qrels/$train_split.tsv" "$dataset/qrels/$test_split.tsv" "$gguf"; do
  [[ -f "$path" || -f "$path.gz" ]] || {
    echo "recipe.sh: $path not found (give --shared=DIR, the folder holding data/, or --dataset and its splits)" >&2
    exit 2
  }
done
test_qrels="$dataset/qrels/$test_split.tsv"
[[ -f "$test_qrels" ]] || test_qrels+=.gz
# What the CPU budget cuts and METHOD keeps: the config variant, the documents' training cut, the expert's
# candidates, in-context examples, thought tokens (written and generated) and mined negatives.
if [[ "$preset" == scifact-gpu ]]; then
  variant=":gpu" train_doc_tokens=192 candidates=3 examples=3 thought_tokens=128 negatives=15
else
  variant="" train_doc_tokens="$doc_tokens" candidates=2 examples=0 thought_tokens=40 negatives=7
  # These run on the CPU; without this, jax would first probe for a TPU (libtpu is a test requirement).
  export JAX_PLATFORMS=cpu
fi
examples="${examples_option:-$examples}" candidates="${candidates_option:-$candidates}"
thought_tokens="${thought_tokens_option:-$thought_tokens}"
[[ "$examples" =~ ^[0-9]+$ ]] || { echo "recipe.sh: --examples=$examples: not a whole number" >&2; exit 2; }
for option in doc_tokens candidates thought_tokens; do
  [[ "${!option}" =~ ^[1-9][0-9]*$ ]] || { echo "recipe.sh: --$option=${!option}: not a positive integer" >&2; exit 2; }
done
[[ -z "$thought_drop" || "$thought_drop" =~ ^(0(\.[0-9]+)?|1(\.0*)?)$ ]] || {
  echo "recipe.sh: --thought_drop=$thought_drop: not a number from 0 to 1" >&2; exit 2; }
[[ -z "$w_gen" || "$w_gen" =~ ^[0-9]+(\.[0-9]+)?$ ]] || {
  echo "recipe.sh: --w_gen=$w_gen: not a non-negative number" >&2; exit 2; }
# jax keys hold 32 bits; ten digits and the bound keep the check in bash's integers.
for option in seed contrastive_seed; do
  [[ -z "${!option}" || ( "${!option}" =~ ^[0-9]{1,10}$ && 10#${!option} -lt 4294967296 ) ]] || {
    echo "recipe.sh: --$option=${!option}: not a whole number below 2**32" >&2; exit 2; }
done
[[ -z "$dtype" || "$dtype" == float32 || "$dtype" == bfloat16 ]] || {
  echo "recipe.sh: --dtype=$dtype: expected float32 or bfloat16" >&2; exit 2; }
# The diagnosis draws the expert's examples from the train split, as synthesis did: test pairs would be labels.
example_split=()
(( examples == 0 )) || example_split=(--example_split="$train_split")

# What the stages' results depend on besides the code, one per line; thought_drop, w_gen and seed change only (a),
# contrastive_seed only (b) (the last four lines; all but thought_drop only when given, so runs made before they
# existed keep their settings).
newline=$'\n'
settings="preset=$preset
dataset=$(realpath -m "$dataset")
train_split=$train_split
test_split=$test_split
doc_tokens=$doc_tokens
limit=$limit
shards=$shards
steps=$steps
max_queries=$max_queries
examples=$examples
candidates=$candidates
thought_tokens=$thought_tokens
trainer_overrides=$*${dtype:+${newline}dtype=$dtype}
thought_drop=${thought_drop:-config}${w_gen:+${newline}w_gen=$w_gen}${seed:+${newline}seed=$seed}\
${contrastive_seed:+${newline}contrastive_seed=$contrastive_seed}"
# The lines of settings $1 that part $2 of the stages depends on: shared (every line before thought_drop), a
# (thought_drop, w_gen, seed) or b (contrastive_seed).
settings_part() {
  case "$2" in
    shared) echo "${1%$'\n'thought_drop=*}" ;;
    a) grep -E '^(thought_drop|w_gen|seed)=' <<< "$1" || true ;;
    b) grep -E '^contrastive_seed=' <<< "$1" || true ;;
  esac
}
# The first setting of file $1 that differs from this run's, as "its 'A', this run's 'B'"; nothing when they agree
# (on the lines of part $2 only, when given).
differing_setting() {
  local mine theirs
  mine="$settings"
  theirs="$(cat "$1")"
  if [[ -n "${2:-}" ]]; then mine="$(settings_part "$mine" "$2")" theirs="$(settings_part "$theirs" "$2")"; fi
  [[ "$mine" == "$theirs" ]] && return
  { diff <(echo "$theirs") <(echo "$mine") || true; } | awk '/^</ && !a {a = substr($0, 3)} /^>/ && !b {b = substr($0, 3)}
                                                 END {printf "its \047%s\047, this run\047s \047%s\047", a, b}'
}
if [[ -f "$out/stages/settings" ]]; then
  differs="$(differing_setting "$out/stages/settings")"
  [[ -z "$differs" ]] || { echo "recipe.sh: --out=$out was made with other settings ($differs): give another --out" >&2
                           exit 2; }
fi
if [[ -n "$reuse" ]]; then
  [[ -f "$reuse/stages/settings" ]] || { echo "recipe.sh: --reuse=$reuse: no stages/settings (not a recipe run)" >&2
                                         exit 2; }
  differs="$(differing_setting "$reuse/stages/settings" shared)"
  [[ -z "$differs" ]] || { echo "recipe.sh: --reuse=$reuse was made with other settings ($differs)" >&2; exit 2; }
fi
mkdir -p "$out/stages"
[[ "${O1_DRY_RUN:-0}" == 1 || -f "$out/stages/settings" ]] || echo "$settings" > "$out/stages/settings"
# What each stage leaves in the run directory (DIR/* : a directory of links to RUN's entries, which this run's
# comparisons write beside), and which part of the settings it depends on.
declare -A stage_outputs=([thoughts]="thoughts" [convert]="untrained_hf" [untrained]="eval/untrained"
                          [train]="train train_metrics.jsonl tensorboard" [trained]="eval/trained/*"
                          [diagnose]="diagnosis" [diagnosis]="eval/diagnosis/*"
                          [train_contrastive]="train_contrastive train_contrastive_metrics.jsonl tensorboard_contrastive"
                          [contrastive]="eval/contrastive-only")
declare -A stage_part=([thoughts]=shared [convert]=shared [untrained]=shared [train]=a [trained]=a [diagnose]=a
                       [diagnosis]=a [train_contrastive]=b [contrastive]=b)

# Runs stage $1 (the command "${@:2}") unless it finished before or --reuse links it; records its wall time.
stage() {
  local name="$1" start path
  shift
  if [[ -f "$out/stages/$name.seconds" ]]; then
    echo "== $name: done in an earlier run ($(cat "$out/stages/$name.seconds") s), skipped" >&2
    return
  fi
  # Its outputs are links into the run it came from: running it here would write there.
  if [[ -f "$out/stages/$name.reused" ]]; then
    echo "== $name: reused from $(cat "$out/stages/$name.reused") in an earlier run, skipped" >&2
    return
  fi
  # RUN's stage ran there or was itself reused (its links lead to where it ran).
  if [[ -n "$reuse" && ( -f "$reuse/stages/$name.seconds" || -f "$reuse/stages/$name.reused" ) \
        && -z "$(differing_setting "$reuse/stages/settings" "${stage_part[$name]}")" ]]; then
    echo "== $name: reused from $reuse" >&2
    for path in ${stage_outputs[$name]}; do
      if [[ "$path" == */\* ]]; then
        path="${path%/\*}"
        o1_run mkdir -p "$out/$path"
        for entry in "$reuse/$path"/*; do
          [[ -e "$entry" ]] && o1_run ln -sfn "$(realpath "$entry")" "$out/$path/$(basename "$entry")"
        done
        continue
      fi
      [[ -e "$reuse/$path" ]] || continue
      o1_run mkdir -p "$(dirname "$out/$path")"
      o1_run ln -sfn "$(realpath "$reuse/$path")" "$out/$path"
    done
    [[ "${O1_DRY_RUN:-0}" == 1 ]] || echo "$reuse" > "$out/stages/$name.reused"
    return
  fi
  echo "== $name" >&2
  start=$(date +%s)
  o1_run "$@"
  [[ "${O1_DRY_RUN:-0}" == 1 ]] || echo "$(( $(date +%s) - start ))" > "$out/stages/$name.seconds"
}

# Evaluation cuts documents as training does: METHOD's 512 tokens would take over an hour per model here.
eval_args=(--dataset="$dataset" --split="$test_split" --doc_tokens="$doc_tokens" --max_queries="$max_queries"
           ${dtype:+--dtype="$dtype"})
# Both arms share every trainer option but the objective, so they differ only in the thoughts. Synthesis names its
# shards after the split it read.
train_args=(--config="$O1_LAUNCH_DIR/../configs/smollm2_135m_scifact.py$variant" --config.model.path="$gguf"
            --config.data.train_files="('$out/thoughts/$train_split-*.tfrecord',)"
            --config.train.lengths.doc="$train_doc_tokens"
            ${steps:+--config.train.steps="$steps"} ${dtype:+--config.model.dtype="$dtype"})

stage thoughts python -m data_tools.synthesize --dataset="$dataset" --split="$train_split" --out="$out/thoughts" \
  --num_shards="$shards" --expert=local --model="$gguf" --members=bm25,st --k="$candidates" \
  --num_examples="$examples" --max_new_tokens="$thought_tokens" --batch_size=64 --queries_per_batch=32 \
  --num_negatives="$negatives" ${limit:+--limit="$limit"}

stage convert python -m o1jax.convert gguf-to-hf --gguf="$gguf" --out="$out/untrained_hf" --overwrite
stage untrained python -m o1jax.eval --checkpoint="$out/untrained_hf" --think=off --baselines=bm25,minilm \
  --out="$out/eval/untrained" "${eval_args[@]}"

stage train python -m o1jax.train "${train_args[@]}" --config.checkpoint.dir="$out/train" \
  --config.log.jsonl="$out/train_metrics.jsonl" --config.log.tensorboard_dir="$out/tensorboard" "$@" \
  ${thought_drop:+--config.train.thought_drop="$thought_drop"} ${w_gen:+--config.train.w_gen="$w_gen"} \
  ${seed:+--config.seed="$seed" --config.data.shuffle_seed="$seed"}
stage trained python -m o1jax.eval --checkpoint="$out/train" --think=3 --max_new_tokens="$thought_tokens" --baselines= \
  --out="$out/eval/trained" "${eval_args[@]}" ${seed:+--seed="$seed"}

# thought_drop=1 empties every thought (batching draws the drop before the positive and negatives, so each query
# still meets the same documents); w_gen=0 drops the behaviour-cloning loss, which would have no tokens to clone.
stage train_contrastive python -m o1jax.train "${train_args[@]}" --config.checkpoint.dir="$out/train_contrastive" \
  --config.log.jsonl="$out/train_contrastive_metrics.jsonl" --config.log.tensorboard_dir="$out/tensorboard_contrastive" \
  "$@" --config.train.w_gen=0 --config.train.thought_drop=1.0 \
  ${contrastive_seed:+--config.seed="$contrastive_seed" --config.data.shuffle_seed="$contrastive_seed"}
stage contrastive python -m o1jax.eval --checkpoint="$out/train_contrastive" --think=off --baselines= \
  --out="$out/eval/contrastive-only" "${eval_args[@]}"

# Where the gain is lost, on the same test queries: the expert's own thoughts (its first candidate, and the one the
# committee chose by comparing with a relevant document) and an oracle thought (a relevant document's first words),
# each embedded by (a) in place of its own, with how close every source's thoughts come to the relevant documents.
# The expert's candidates depend only on settings --reuse checked, so a reused run's are taken, not written again.
earlier_candidates="${reuse:+$reuse/diagnosis/candidates.thoughts.jsonl}"
[[ -n "$earlier_candidates" && -f "$earlier_candidates" ]] || earlier_candidates=""
stage diagnose python -m data_tools.diagnose --dataset="$dataset" --split="$test_split" --max_queries="$max_queries" \
  --out="$out/diagnosis" --expert=local --model="$gguf" --members=bm25,st --k="$candidates" \
  --num_examples="$examples" "${example_split[@]}" ${earlier_candidates:+--candidates_from="$earlier_candidates"} \
  --max_new_tokens="$thought_tokens" --batch_size=64 --score=trained="$out/eval/trained/o1jax_think_3.thoughts.jsonl"
stage diagnosis python -m o1jax.eval --checkpoint="$out/train" --think=off --max_new_tokens="$thought_tokens" --baselines= \
  --thoughts_from=expert="$out/diagnosis/expert.thoughts.jsonl" \
  --thoughts_from=expert-chosen="$out/diagnosis/expert-chosen.thoughts.jsonl" \
  --thoughts_from=oracle="$out/diagnosis/oracle.thoughts.jsonl" --out="$out/eval/diagnosis" "${eval_args[@]}"

# Paired tests on the same queries (the p-values the report quotes): thinking against each alternative, and the
# given thoughts against no thinking.
compare() {  # RUN_A NAME_A RUN_B NAME_B JSON
  o1_run python -m o1jax.eval.compare "$1" "$3" --qrels="$test_qrels" --names="$2,$4" --json="$5"
}
trained="$out/eval/trained" diagnosis="$out/eval/diagnosis"
compare "$trained/o1jax_think_3.trec" think=3 "$trained/o1jax_no-think.trec" no-think "$trained/compare-no-think.json"
compare "$trained/o1jax_think_3.trec" think=3 "$out/eval/contrastive-only/o1jax_no-think.trec" contrastive-only \
  "$trained/compare-contrastive-only.json"
for given in expert oracle; do
  compare "$diagnosis/o1jax_thoughts_$given.trec" "thoughts=$given" "$trained/o1jax_no-think.trec" no-think \
    "$diagnosis/compare-$given-no-think.json"
done
o1_run python -m launch.report --run="$out"
