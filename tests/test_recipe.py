"""The thinking ablation recipe (`launch/recipe.sh`; `launch/scifact.sh` is its SciFact preset, README "Results"):
the script runs every stage for real on a SciFact subset with SmolLM2-135M, both trained arms, the diagnosis (the
expert's and an oracle's thoughts embedded by the trained model, thought quality) and every paired comparison
included, and reports one table; a second run skips finished stages; a run reusing another's stages links them and
retrains to the same table, and refuses other settings; the CoSQA preset's commands are
checked dry; the committed results are what the report renders, and the README shows them; the report names bad
input.
"""
import json
import pathlib
import re
import shlex
import subprocess

import pytest

from data_tools import subset
from data_tools.shards import shard_name
from launch import report
from o1jax import config as o1config
from o1jax.data.readers import load_beir
from o1jax.eval.compare.__main__ import main as compare_main
from test_launch import clean_env  # pylint: disable=wrong-import-order  (tests/ is on sys.path)

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "launch" / "results" / "scifact"
COSQA = ROOT / "launch" / "results" / "cosqa"
ROWS = ["trained, think=3", "trained, no thinking", "trained, thoughts=expert", "trained, thoughts=expert-chosen",
        "trained, thoughts=oracle", "contrastive-only, no thinking", "untrained, no thinking", "BM25", "MiniLM-L6-v2"]


def recipe(shared_dir, out, dataset, *options) -> subprocess.CompletedProcess:
  return subprocess.run(
      ["bash", "launch/scifact.sh", f"--shared={shared_dir}", f"--out={out}", f"--dataset={dataset}", "--limit=8",
       "--shards=1", "--steps=2", "--max_queries=4", *options, "--", "--config.train.batch_queries=4"],
      cwd=ROOT, env=clean_env(O1JAX_CACHE=str(out / "cache")), capture_output=True, text=True, timeout=1200)


def printed_commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
  """The commands a dry run printed ("+ " lines), split as the shell would."""
  return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def dry_run(shared_dir, out, *options) -> list[list[str]]:
  """The commands launch/recipe.sh with `options` would run (it must accept them)."""
  proc = subprocess.run(["bash", "launch/recipe.sh", f"--shared={shared_dir}", f"--out={out}", *options, "--dry-run"],
                        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return printed_commands(proc)


@pytest.fixture(scope="module")
def quick_run(shared_dir, tmp_path_factory):
  dataset = tmp_path_factory.mktemp("data") / "scifact"
  subset.main([f"--dataset={shared_dir / 'data' / 'beir-scifact'}", f"--out={dataset}", "--queries=train:10",
               "--queries=test:4", "--other_docs=30"])
  out = tmp_path_factory.mktemp("run")
  proc = recipe(shared_dir, out, dataset)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, dataset, proc


def test_every_stage_runs_and_the_report_is_one_table(quick_run):
  out, _, proc = quick_run
  assert sorted(p.stem for p in (out / "stages").glob("*.seconds")) == sorted(report.STAGE_ORDER)
  manifest = json.loads((out / "thoughts" / "manifest.json").read_text())
  assert manifest["num_records"] == 8 and manifest["config"]["members"] == "bm25,st"
  results = report.collect(out)
  assert list(results.rows) == ROWS
  assert [s["step"] for s in results.steps] == [1, 2]
  # The contrastive-only arm trains the same steps with no thought token in any query and no behaviour-cloning loss.
  assert [s["step"] for s in results.contrastive_steps] == [1, 2]
  assert all(s["gen_tokens"] == 0 and s["loss_gen"] == 0 for s in results.contrastive_steps)
  assert all(s["gen_tokens"] > 0 and s["loss_gen"] > 0 for s in results.steps)
  markdown = (out / "results.md").read_text()
  assert markdown == report.render_markdown(results) and markdown in proc.stdout
  # The table's numbers are those the evaluation CLI wrote.
  trained = json.loads((out / "eval" / "trained" / "summary.json").read_text())["metrics"]
  assert f"| trained, think=3 | {trained['o1jax think=3']['ndcg@10']:.4f} |" in markdown
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_comparison_is_of_the_evaluated_runs_and_their_commands_reproduce_them(quick_run):
  out, _, proc = quick_run
  results = report.collect(out)
  assert [c["names"] for c in results.comparisons] == [
      ["think=3", "contrastive-only"], ["think=3", "no-think"], ["thoughts=expert", "no-think"],
      ["thoughts=oracle", "no-think"]]
  markdown = (out / "results.md").read_text()
  rows = {"think=3": "trained, think=3", "no-think": "trained, no thinking",
          "contrastive-only": "contrastive-only, no thinking", "thoughts=expert": "trained, thoughts=expert",
          "thoughts=oracle": "trained, thoughts=oracle"}
  for comparison in results.comparisons:
    # The means compared are the table's nDCG@10 (each from its own run file, through pytrec_eval both times).
    a, b = comparison["names"]
    assert comparison["mean_a"] == pytest.approx(results.rows[rows[a]]["ndcg@10"], abs=1e-12)
    assert comparison["mean_b"] == pytest.approx(results.rows[rows[b]]["ndcg@10"], abs=1e-12)
    assert comparison["queries"] == 4
    assert f"| {comparison['randomization_pvalue']:.4f} |" in markdown and comparison["command"] in markdown
    argv = shlex.split(comparison["command"])
    assert argv[:3] == ["python", "-m", "o1jax.eval.compare"]
    assert compare_main(argv[3:]).randomization_pvalue == comparison["randomization_pvalue"]


def test_the_diagnosis_embeds_the_experts_and_an_oracles_thoughts_for_the_evaluated_queries(quick_run):
  out, dataset, _ = quick_run
  test = load_beir(dataset, "test")
  evaluated = list(test.queries)  # --max_queries=4 of 4
  diagnosis = out / "diagnosis"
  written = {name: [json.loads(line) for line in (diagnosis / f"{name}.thoughts.jsonl").read_text().splitlines()]
             for name in ("expert", "expert-chosen", "oracle")}
  for records in written.values():
    assert [r["query_id"] for r in records] == evaluated and all(len(r["thoughts"]) == 1 for r in records)
  for record in written["oracle"]:
    relevant = test.corpus[min(d for d, grade in test.qrels[record["query_id"]].items() if grade > 0)]
    assert record["thoughts"] == [" ".join(f"{relevant.title} {relevant.text}".split()[:32])]
  # The trained model embedded exactly those thoughts (cut to its 40-token budget) in the diagnosis rows.
  embedded = [json.loads(line) for line in
              (out / "eval" / "diagnosis" / "o1jax_thoughts_expert.thoughts.jsonl").read_text().splitlines()]
  assert [r["query_id"] for r in embedded] == evaluated
  assert all(0 < len(r["token_ids"][0]) <= 40 for r in embedded)
  quality = json.loads((diagnosis / "quality.json").read_text())
  assert quality["queries"] == 4 and quality["k"] == 2
  assert set(quality["sources"]) == {"query", "expert", "expert-random", "expert-chosen", "oracle", "trained"}
  assert quality["sources"]["trained"]["thoughts_per_query"] == 3  # the trained model's own, from its evaluation
  assert quality["sources"]["oracle"]["share_in_relevant"] == 1.0
  results = report.collect(out)
  markdown = (out / "results.md").read_text()
  assert f"| oracle | 1.0 | {quality['sources']['oracle']['words']:.1f} |" in markdown
  assert quality["command"] in markdown and "Thoughts, verbatim, for the first 3 test queries" in markdown
  assert [e["query"] for e in results.examples] == [test.queries[q] for q in evaluated[:3]]
  assert results.examples[0]["expert"] == written["expert"][0]["thoughts"][0]


def test_a_published_run_holds_real_copies_of_what_its_report_reads(quick_run, tmp_path):
  """`launch.report --run=RUN --publish=DIR`, as launch/results is made: through links (a --reuse run's), the files
  the report reads and nothing large; the same report; publishing again replaces the folder whole."""
  out, _, _ = quick_run
  linked = tmp_path / "linked"
  linked.mkdir()
  for entry in out.iterdir():
    (linked / entry.name).symlink_to(entry)
  published = tmp_path / "results" / "run"
  (published / "eval" / "gone").mkdir(parents=True)
  (published / "eval" / "gone" / "summary.json").write_text("an earlier publish's evaluation")
  assert report.main([f"--run={linked}", f"--publish={published}"]) == report.collect(out)
  files = sorted(str(p.relative_to(published)) for p in published.rglob("*") if p.is_file())
  assert not any(p.is_symlink() for p in published.rglob("*"))
  assert "eval/gone/summary.json" not in files and "diagnosis/candidates.thoughts.jsonl" not in files
  assert {"eval/untrained/summary.json", "thoughts/manifest.json", "results.png"} <= set(files)
  assert not [f for f in files if f.startswith(("train/", "thoughts/dev", "thoughts/train", "untrained_hf/"))]
  assert (published / "results.md").read_text() == (out / "results.md").read_text()
  assert sorted(p.name for p in published.parent.iterdir()) == ["run"]  # no staging folder left behind
  # A folder holding anything a publish does not write (a run's checkpoints, other results) is never replaced.
  for target in (out, published.parent):
    with pytest.raises(ValueError, match=f"--publish={target} holds .*, which a publish does not write"):
      report.publish(out, target)
  assert (out / "train").is_dir() and (published / "results.md").exists()
  with pytest.raises(SystemExit):
    report.main([f"--lever=a={out}", f"--publish={published}"])


def test_a_second_run_skips_finished_stages(quick_run, shared_dir):
  out, dataset, _ = quick_run
  proc = recipe(shared_dir, out, dataset, "--dry-run")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.count("done in an earlier run") == len(report.STAGE_ORDER)
  assert not [line for line in proc.stdout.splitlines() if line.startswith("+ python -m o1jax.train")]


REUSABLE = {"thoughts": ["thoughts"], "convert": ["untrained_hf"], "untrained": ["eval/untrained"],
            "train_contrastive": ["train_contrastive", "train_contrastive_metrics.jsonl", "tensorboard_contrastive"],
            "contrastive": ["eval/contrastive-only"]}


def test_a_run_reusing_an_earlier_ones_stages_retrains_to_the_same_table(quick_run, shared_dir, tmp_path):
  """--reuse links what a lever of (a) alone leaves unchanged and runs the rest: with a lever that changes nothing
  (--seed=0, the config's own), training again from the same shards, config and seed reproduces every row and loss
  to the last digit."""
  out, dataset, _ = quick_run
  lever = tmp_path / "lever"
  proc = recipe(shared_dir, lever, dataset, f"--reuse={out}", "--seed=0")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stderr.count(f"reused from {out}") == len(REUSABLE)
  for stage, paths in REUSABLE.items():
    assert (lever / "stages" / f"{stage}.reused").read_text().strip() == str(out)
    assert not (lever / "stages" / f"{stage}.seconds").exists()
    for path in paths:
      assert (lever / path).resolve() == (out / path).resolve() != lever / path
  before, after = report.collect(out), report.collect(lever)
  assert after.rows == before.rows
  assert [s["loss"] for s in after.steps] == [s["loss"] for s in before.steps]
  # The diagnosis judged the earlier run's expert candidates instead of running the expert again.
  earlier = out / "diagnosis" / "candidates.thoughts.jsonl"
  assert json.loads((lever / "diagnosis" / "quality.json").read_text())["candidates_from"] == str(earlier)
  for name in ("candidates", "expert", "expert-chosen"):
    assert (lever / "diagnosis" / f"{name}.thoughts.jsonl").read_text() == (
        out / "diagnosis" / f"{name}.thoughts.jsonl").read_text()
  assert after.reused == {stage: str(out) for stage in REUSABLE}
  assert sorted(after.stage_seconds) == sorted(set(report.STAGE_ORDER) - set(REUSABLE))
  assert (f"Reused from `{out}` (its results, not run again here): thoughts, convert, untrained, train_contrastive, "
          "contrastive.") in (lever / "results.md").read_text()
  # Run again without --reuse, the linked stages stay linked: running one would write into the other run.
  again = recipe(shared_dir, lever, dataset, "--seed=0", "--dry-run")
  assert again.returncode == 0 and again.stderr.count(f"reused from {out} in an earlier run") == len(REUSABLE)


def test_a_lever_of_a_alone_trains_only_a_and_other_settings_are_refused(quick_run, shared_dir, tmp_path):
  out, dataset, _ = quick_run
  proc = recipe(shared_dir, tmp_path / "drop", dataset, f"--reuse={out}", "--thought_drop=0.5", "--w_gen=1.0",
                "--dry-run")
  assert proc.returncode == 0, proc.stderr
  commands = printed_commands(proc)
  trainings = [c for c in commands if c[:3] == ["python", "-m", "o1jax.train"]]
  assert len(trainings) == 1
  assert trainings[0][-2:] == ["--config.train.thought_drop=0.5", "--config.train.w_gen=1.0"]
  assert sum(c[:2] == ["ln", "-sfn"] for c in commands) == sum(map(len, REUSABLE.values()))
  # A replicate of (a): its training and its thoughts' sampling take the seed, nothing else does.
  replicate = recipe(shared_dir, tmp_path / "replicate", dataset, f"--reuse={out}", "--w_gen=1.0", "--seed=7",
                     "--dry-run")
  assert replicate.returncode == 0, replicate.stderr
  seeds = ("--seed=", "--config.seed=", "--config.data.shuffle_seed=")
  seeded = [c for c in printed_commands(replicate) if any(arg.startswith(seeds) for arg in c)]
  assert [c[2] for c in seeded] == ["o1jax.train", "o1jax.eval"]
  assert seeded[0][-3:] == ["--config.train.w_gen=1.0", "--config.seed=7", "--config.data.shuffle_seed=7"]
  assert seeded[1][-1] == "--seed=7" and "--think=3" in seeded[1]
  # A replicate of (b) alone: its training takes the seed; (a)'s stages are linked, its evaluation folders as folders
  # of links (this run's comparisons are written there beside them). With no lever at all, nothing runs again.
  replicate_b = printed_commands(recipe(shared_dir, tmp_path / "b", dataset, f"--reuse={out}", "--contrastive_seed=5",
                                        "--dry-run"))
  trainings = [c for c in replicate_b if c[:3] == ["python", "-m", "o1jax.train"]]
  assert len(trainings) == 1 and "--config.train.thought_drop=1.0" in trainings[0]
  assert trainings[0][-2:] == ["--config.seed=5", "--config.data.shuffle_seed=5"]
  linked = {c[-1] for c in replicate_b if c[:2] == ["ln", "-sfn"]}
  assert {str(tmp_path / "b" / p) for p in ("train", "diagnosis", "thoughts")} <= linked
  assert str(tmp_path / "b" / "eval" / "trained" / "o1jax_think_3.trec") in linked
  assert str(tmp_path / "b" / "eval" / "trained") not in linked
  assert [c[2] for c in replicate_b if c[:2] == ["python", "-m"]] == [
      "o1jax.train", "o1jax.eval", *["o1jax.eval.compare"] * 4, "launch.report"]
  nothing = printed_commands(recipe(shared_dir, tmp_path / "same", dataset, f"--reuse={out}", "--dry-run"))
  assert [c[2] for c in nothing if c[:2] == ["python", "-m"]] == [*["o1jax.eval.compare"] * 4, "launch.report"]
  # Anything else that changes a reused stage's results is a different run: named, and nothing runs.
  for options, where in (([f"--reuse={out}", "--examples=3"], f"--reuse={out}"), (["--candidates=3"], f"--out={out}")):
    target = tmp_path / "other" if options[0].startswith("--reuse") else out
    refused = recipe(shared_dir, target, dataset, *options, "--dry-run")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    lever = options[-1].lstrip("-").split("=")[0]
    preset = {"examples": 0, "candidates": 2}[lever]
    assert (f"recipe.sh: {where} was made with other settings (its '{lever}={preset}', this run's '{options[-1][2:]}')"
            in refused.stderr), refused.stderr
    assert not refused.stdout
  # Of several, the first that differs is named.
  refused = recipe(shared_dir, tmp_path / "other", dataset, f"--reuse={out}", "--examples=3", "--candidates=3",
                   "--dry-run")
  assert refused.returncode == 2 and "(its 'examples=0', this run's 'examples=3')" in refused.stderr, refused.stderr


def test_missing_shared_data_is_named(tmp_path):
  proc = subprocess.run(["bash", "launch/scifact.sh", f"--shared={tmp_path}", f"--out={tmp_path / 'run'}"],
                        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert f"{tmp_path}/data/beir-scifact/qrels/train.tsv not found" in proc.stderr
  assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("option, message", [("--preset=msmarco", "--preset=msmarco: unknown preset"),
                                             ("--doc_tokens=0", "--doc_tokens=0: not a positive integer"),
                                             ("--train_split=nope", "qrels/nope.tsv not found"),
                                             ("--examples=-1", "--examples=-1: not a whole number"),
                                             ("--candidates=0", "--candidates=0: not a positive integer"),
                                             ("--thought_tokens=x", "--thought_tokens=x: not a positive integer"),
                                             ("--thought_drop=1.5", "--thought_drop=1.5: not a number from 0 to 1"),
                                             ("--w_gen=-1", "--w_gen=-1: not a non-negative number"),
                                             ("--seed=-1", "--seed=-1: not a whole number below 2**32"),
                                             ("--seed=4294967296", "--seed=4294967296: not a whole number below"),
                                             ("--contrastive_seed=x", "--contrastive_seed=x: not a whole number"),
                                             ("--dtype=float16", "--dtype=float16: expected float32 or bfloat16")])
def test_bad_options_are_named(shared_dir, tmp_path, option, message):
  proc = subprocess.run(["bash", "launch/recipe.sh", f"--shared={shared_dir}", f"--out={tmp_path}", option],
                        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_cosqa_preset_trains_on_dev_and_evaluates_on_test(shared_dir, tmp_path):
  out = tmp_path / "run"
  commands = dry_run(shared_dir, out, "--preset=cosqa")
  modules = [c[2] for c in commands]
  assert modules == ["data_tools.synthesize", "o1jax.convert", "o1jax.eval", "o1jax.train", "o1jax.eval", "o1jax.train",
                     "o1jax.eval", "data_tools.diagnose", "o1jax.eval"] + ["o1jax.eval.compare"] * 4 + ["launch.report"]
  cosqa = shared_dir / "data" / "cosqa-retrieval"
  assert f"--dataset={cosqa}" in commands[0] and "--split=dev" in commands[0]
  assert {f"--dataset={cosqa}", "--split=test"} <= set(commands[7])
  for evaluation in (commands[2], commands[4], commands[6], commands[8]):
    assert {f"--dataset={cosqa}", "--split=test", "--doc_tokens=128"} <= set(evaluation)
  assert all(f"--qrels={cosqa}/qrels/test.tsv" in c for c in commands[9:13])
  # The dev queries that train and the test queries that evaluate are different queries.
  dev, test = load_beir(cosqa, "dev"), load_beir(cosqa, "test")
  assert (len(dev.queries), len(test.queries)) == (500, 500) and not set(dev.queries) & set(test.queries)
  # Both trainings validate; they differ only in the objective.
  # The shard synthesis writes for the dev split is what both trainings read.
  (out / "thoughts").mkdir(parents=True)
  (out / "thoughts" / shard_name("dev", 0, 1)).write_bytes(b"")
  configs = [o1config.load([a for a in c[3:] if a.startswith("--config")]) for c in (commands[3], commands[5])]
  for config in configs:
    assert o1config.validate(config, device_count=1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert config.train.lengths.doc == 128
  (thinking, contrastive) = (c.train.to_dict() for c in configs)
  assert {k: (thinking[k], contrastive[k]) for k in thinking if thinking[k] != contrastive[k]} == {
      "w_gen": (0.2, 0.0), "thought_drop": (0.1, 1.0)}


def test_scifact_gpu_preset_keeps_methods_lengths(shared_dir, tmp_path):
  """The GPU preset's commands, dry: METHOD's thoughts (k=3 candidates with 3 in-context examples, 128 tokens,
  15 negatives), documents at 192 tokens in training and 512 in evaluation, the config's ':gpu' variant; both
  trainings validate and still differ only in the objective. (Run for real on a subset: README, "The recipe".)"""
  out = tmp_path / "run"
  commands = dry_run(shared_dir, out, "--preset=scifact-gpu")
  assert {"--k=3", "--num_examples=3", "--max_new_tokens=128", "--num_negatives=15", "--split=train"} <= set(commands[0])
  for evaluation in (commands[2], commands[4], commands[6], commands[8]):
    assert {"--split=test", "--doc_tokens=512"} <= set(evaluation)
  assert "--max_new_tokens=128" in commands[4] and "--max_new_tokens=128" in commands[8]
  # The diagnosis asks the same expert, its examples drawn from the train split (test pairs would be labels).
  assert {"--k=3", "--num_examples=3", "--example_split=train", "--max_new_tokens=128"} <= set(commands[7])
  (out / "thoughts").mkdir(parents=True)
  (out / "thoughts" / shard_name("train", 0, 1)).write_bytes(b"")
  configs = [o1config.load([a for a in c[3:] if a.startswith("--config")]) for c in (commands[3], commands[5])]
  for config in configs:
    assert o1config.validate(config, device_count=1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert dict(config.train.lengths) == {"query": 32, "query_thought": 256, "doc": 192}
    assert (config.train.batch_queries, config.train.group_size, config.model.dtype) == (32, 16, "bfloat16")
    assert config.model.remat_policy == "save_qkv_proj"
  (thinking, contrastive) = (c.train.to_dict() for c in configs)
  assert {k: (thinking[k], contrastive[k]) for k in thinking if thinking[k] != contrastive[k]} == {
      "w_gen": (0.2, 0.0), "thought_drop": (0.1, 1.0)}


def test_the_experts_levers_reach_synthesis_and_the_diagnosis(shared_dir, tmp_path):
  """--examples, --candidates and --thought_tokens replace the preset's: the expert that writes the training thoughts
  is the one the diagnosis asks, and the trained model thinks as long as the thoughts it cloned; a zero-shot run
  names no example split."""
  def commands(*levers):
    return [set(c) for c in dry_run(shared_dir, tmp_path / "run", *levers)]
  lever = commands("--examples=3", "--candidates=4", "--thought_tokens=64")
  assert {"--k=4", "--num_examples=3", "--max_new_tokens=64", "--split=train"} <= lever[0]
  assert {"--k=4", "--num_examples=3", "--example_split=train", "--max_new_tokens=64", "--split=test"} <= lever[7]
  assert {"--think=3", "--max_new_tokens=64"} <= lever[4]
  preset = commands()
  assert {"--k=2", "--num_examples=0", "--max_new_tokens=40"} <= preset[0] and "--num_examples=0" in preset[7]
  assert not any(a.startswith("--example_split") for a in preset[7])


def test_bfloat16_reaches_both_trainings_and_every_evaluation(shared_dir, tmp_path):
  """--dtype=bfloat16, dry: both trainings compute in bfloat16 (their configs validate, weights stay float32), every
  o1jax.eval stage loads the model in bfloat16, and the expert's stages are as without it; without it no command
  names a dtype (the preset's configs and evaluation defaults decide, as before the option)."""
  half, default = dry_run(shared_dir, tmp_path / "run", "--dtype=bfloat16"), dry_run(shared_dir, tmp_path / "run")
  assert [c[2] for c in half] == [c[2] for c in default]
  for ours, theirs in zip(half, default):
    added = set(ours) - set(theirs)
    if ours[2] == "o1jax.eval":
      assert added == {"--dtype=bfloat16"}
    elif ours[2] == "o1jax.train":
      assert added == {"--config.model.dtype=bfloat16"}
    else:
      assert ours == theirs
  assert not any("dtype" in a for c in default for a in c)
  (tmp_path / "run" / "thoughts").mkdir(parents=True)
  (tmp_path / "run" / "thoughts" / shard_name("train", 0, 1)).write_bytes(b"")
  for training in (c for c in half if c[2] == "o1jax.train"):
    config = o1config.load([a for a in training[3:] if a.startswith("--config")])
    assert o1config.validate(config, device_count=1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")


def test_config_validates_with_the_shared_model(smollm2_gguf, tmp_path):
  shard = tmp_path / "train-00000-of-00001.tfrecord"
  shard.write_bytes(b"")
  config = o1config.load(["--config=configs/smollm2_135m_scifact.py", f"--config.model.path={smollm2_gguf}",
                          f"--config.data.train_files=('{tmp_path}/train-*.tfrecord',)"])
  assert o1config.validate(config, device_count=1) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert (config.train.lengths.doc, config.train.finetune) == (64, "full")


def test_committed_results_are_the_reports_rendering_and_in_the_readme():
  results = report.collect(RESULTS)
  assert list(results.rows) == ROWS and results.ours == ROWS[:7]
  assert list(results.stage_seconds) == list(report.STAGE_ORDER)
  assert len(results.comparisons) == 4 and len(results.contrastive_steps) == 50 and len(results.examples) == 3
  assert results.quality["queries"] == 300 and all(c["queries"] == 300 for c in results.comparisons)
  markdown = report.render_markdown(results)
  assert (RESULTS / "results.md").read_text() == markdown
  assert markdown in (ROOT / "README.md").read_text()
  assert (RESULTS / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_cosqa_results_are_the_reports_rendering_and_in_the_readme():
  results = report.collect(COSQA)
  assert list(results.rows) == ROWS and list(results.stage_seconds) == list(report.STAGE_ORDER)
  assert len(results.comparisons) == 4 and all(c["queries"] == 500 for c in results.comparisons)
  assert results.quality["queries"] == 500
  markdown = report.render_markdown(results)
  assert (COSQA / "results.md").read_text() == markdown
  assert markdown in (ROOT / "README.md").read_text()


def test_report_names_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError, match="no evaluation results"):
    report.collect(tmp_path)
  with pytest.raises(FileNotFoundError, match="no evaluation results"):
    report.publish(tmp_path, tmp_path / "published")
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "eval" / "a").mkdir(parents=True)
  (tmp_path / "eval" / "a" / "summary.json").write_text(json.dumps({"metrics": {"BM25": {"ndcg@10": 0.5}}}))
  (tmp_path / "train_metrics.jsonl").write_text('{"step": 1, "loss_ctr": 1.0}\n{"step": 2,\n')
  with pytest.raises(ValueError, match=r"train_metrics.jsonl:2: not a JSON line"):
    report.collect(tmp_path)
  (tmp_path / "eval" / "a" / "summary.json").write_text("{}")
  with pytest.raises(ValueError, match=r"eval/a/summary.json: not a summary.json"):
    report.collect(tmp_path)
  (tmp_path / "eval" / "a" / "summary.json").write_text(json.dumps({"metrics": {"BM25": {"ndcg@10": 0.5}}}))
  (tmp_path / "train_metrics.jsonl").unlink()
  (tmp_path / "eval" / "a" / "compare-b.json").write_text(json.dumps({"names": ["a", "b"]}))
  with pytest.raises(ValueError, match=r"eval/a/compare-b.json: not a JSON file of .* \(no measure, queries"):
    report.collect(tmp_path)


def test_lever_table_sets_runs_side_by_side_from_their_own_files(capsys):
  """`python -m launch.report --lever=NAME=DIR ...`: each row's figures are that run's table rows, its paired
  comparisons (mean difference and randomization p) and its diagnosis, as their own files hold them."""
  assert report.main([f"--lever=scifact={RESULTS}", f"--lever=cosqa={COSQA}"]) is None
  table = capsys.readouterr().out.splitlines()
  assert len(table) == 4 and table[2].startswith("| scifact | ") and table[3].startswith("| cosqa | ")
  for line, run in zip(table[2:], (RESULTS, COSQA)):
    summary = json.loads((run / "eval" / "trained" / "summary.json").read_text())["metrics"]
    versus = json.loads((run / "eval" / "trained" / "compare-contrastive-only.json").read_text())
    quality = json.loads((run / "diagnosis" / "quality.json").read_text())["sources"]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[1:3] == [f"{summary['o1jax think=3']['ndcg@10']:.4f}", f"{summary['o1jax no-think']['ndcg@10']:.4f}"]
    assert cells[5] == f"{versus['mean_difference']:+.4f} (p {versus['randomization_pvalue']:.4f})"
    assert cells[8:] == [f"{quality[source]['minilm_cosine']:.3f}" for source in ("expert", "expert-chosen", "trained")]
  with pytest.raises(SystemExit):
    report.main(["--lever=no-directory"])
  assert "--lever=no-directory: expected NAME=DIR" in capsys.readouterr().err


LEVERS = RESULTS / "levers"

# The README's lever tables, one per dataset: name -> (the run under launch/results, the run it reused the expert's
# thoughts, the untrained row and (b) from, for levers of (a) alone[, the stages it reused when not those]). The
# first of each is the recipe's own run.
LEVER_TABLES = {
    "scifact": {"recipe (zero-shot)": (RESULTS, None),
                "3 in-context examples": (LEVERS / "examples-3", None),
                "3 in-context examples, thought drop 0.5": (LEVERS / "examples-3-drop-0.5", "runs/scifact-examples3"),
                "4 candidates": (LEVERS / "candidates-4", None),
                "4 candidates, w_gen 1.0": (LEVERS / "candidates-4-w_gen-1", "runs/scifact-candidates4"),
                "4 candidates, w_gen 1.0, thought drop 0.5": (LEVERS / "candidates-4-w_gen-1-drop-0.5",
                                                              "runs/scifact-candidates4")},
    "cosqa": {"recipe (float32)": (COSQA, None),
              "bfloat16": (COSQA / "levers" / "bfloat16", None),
              "bfloat16, w_gen 1.0": (COSQA / "levers" / "bfloat16-w_gen-1", "runs/cosqa-bfloat16"),
              "bfloat16, w_gen 1.0, seed 1": (COSQA / "levers" / "bfloat16-w_gen-1-seed-1", "runs/cosqa-bfloat16"),
              "bfloat16, w_gen 1.0, thought drop 0.5": (COSQA / "levers" / "bfloat16-w_gen-1-drop-0.5",
                                                        "runs/cosqa-bfloat16"),
              "bfloat16, w_gen 2.0": (COSQA / "levers" / "bfloat16-w_gen-2", "runs/cosqa-bfloat16"),
              # (b) alone at seed 1, beside the seed-1 (a) (its stages reused, as were the expert's thoughts).
              "bfloat16, w_gen 1.0, seed 1, (b) seed 1": (
                  COSQA / "levers" / "bfloat16-w_gen-1-b-seed-1", "runs/cosqa-bfloat16-w_gen-1-seed-1",
                  ("thoughts", "convert", "untrained", "train", "trained", "diagnose", "diagnosis"))},
}


@pytest.mark.parametrize("dataset", LEVER_TABLES)
def test_committed_lever_runs_are_the_reports_rendering_and_their_table_is_in_the_readme(dataset):
  """The lever runs under launch/results/<dataset>/levers (README "Levers") render as committed, the levers of (a)
  alone reused the expert's thoughts, the untrained row and (b), and the README's lever table is what the report
  prints for them."""
  levers = LEVER_TABLES[dataset]
  runs = {name: report.collect(run) for name, (run, *_) in levers.items()}
  for name, (run, reused_from, *stages) in list(levers.items())[1:]:
    assert list(runs[name].rows) == ROWS and len(runs[name].comparisons) == 4
    assert (run / "results.md").read_text() == report.render_markdown(runs[name])
    assert runs[name].reused == ({stage: reused_from for stage in (stages[0] if stages else REUSABLE)}
                                 if reused_from else {})
  assert report.render_levers(runs) in (ROOT / "README.md").read_text()


def test_cosqa_bfloat16_run_trained_on_the_float32_runs_thoughts():
  """The CoSQA runs in float32 and bfloat16 differ only in how the model computes: the expert (not an o1jax model)
  wrote the same training shards for both, byte for byte."""
  shards = [json.loads((run / "thoughts" / "manifest.json").read_text())["shards"]
            for run in (COSQA, COSQA / "levers" / "bfloat16")]
  assert len(shards[0]) == 8 and shards[0] == shards[1]


def test_cosqa_seed_replicate_trained_a_anew_beside_the_same_b():
  """`--seed=1` retrained (a) alone: other data draws from the first step (so another model), the same (b) row."""
  levers = COSQA / "levers"
  settings = [(levers / run / "stages" / "settings").read_text().splitlines()[-2:]
              for run in ("bfloat16-w_gen-1", "bfloat16-w_gen-1-seed-1")]
  assert settings == [["thought_drop=config", "w_gen=1.0"], ["w_gen=1.0", "seed=1"]]
  seed0, seed1 = (report.collect(levers / run) for run in ("bfloat16-w_gen-1", "bfloat16-w_gen-1-seed-1"))
  assert seed0.steps[0]["loss"] != seed1.steps[0]["loss"] and seed0.steps[0]["lr"] == seed1.steps[0]["lr"]
  assert seed0.rows["contrastive-only, no thinking"] == seed1.rows["contrastive-only, no thinking"]
  assert seed0.rows["trained, think=3"] != seed1.rows["trained, think=3"]


def test_cosqa_seed_averaged_comparisons_are_of_the_published_runs_and_in_the_readme():
  """The test fixed before (b)'s second seed ran: (a) thinking and (b), each averaged per query over two seeds (and
  (a) without thinking beside it). Each side's mean is the mean of its two runs' published nDCG@10, and the README's
  row quotes the JSON."""
  levers = COSQA / "levers"
  ndcg = lambda run, row: report.collect(levers / run).rows[row]["ndcg@10"]
  a_think = [ndcg(run, "trained, think=3") for run in ("bfloat16-w_gen-1", "bfloat16-w_gen-1-seed-1")]
  a_plain = [ndcg(run, "trained, no thinking") for run in ("bfloat16-w_gen-1", "bfloat16-w_gen-1-seed-1")]
  b = [ndcg(run, "contrastive-only, no thinking") for run in ("bfloat16", "bfloat16-w_gen-1-b-seed-1")]
  readme = (ROOT / "README.md").read_text()
  for name, other, label in (("think-vs-b", b, "(a) think=3 vs (b)"),
                             ("think-vs-no-think", a_plain, "(a) think=3 vs (a) no thinking")):
    result = json.loads((levers / f"w_gen-1-seeds-0-1-{name}.json").read_text())
    assert result["queries"] == 500 and [len(runs) for runs in result["runs"]] == [2, 2]
    assert result["mean_a"] == pytest.approx(sum(a_think) / 2, abs=1e-12)
    assert result["mean_b"] == pytest.approx(sum(other) / 2, abs=1e-12)
    p = result["randomization_pvalue"]
    assert (f"| {label} | {result['mean_a']:.4f} | {result['mean_b']:.4f} | {result['mean_difference']:+.4f} "
            f"({result['ci_low']:+.4f} to {result['ci_high']:+.4f}) | {result['wins']} / {result['ties']} / "
            f"{result['losses']} | {f'{p:.4f}' if p >= 1e-4 else '< 0.0001'} |") in readme


def test_every_scifact_lever_trained_the_same_contrastive_only_model():
  """(b) never sees a thought, so every SciFact lever run's (b), whether trained anew from its own shards with every
  thought dropped or reused, is the same model to the last digit."""
  runs = [report.collect(run) for run, _ in LEVER_TABLES["scifact"].values()]
  assert len({str(r.rows["contrastive-only, no thinking"]) for r in runs}) == 1


SAMPLING = LEVERS / "sampling"
# Each evaluation of the drop-0.5 model with other thoughts: its row in summary.json, what it was compared with.
SAMPLED = {"temperature-0.7": ("think=3", ("temperature-0.1", "no-think", "contrastive-only")),
           "temperature-0.7-think-8": ("think=8", ("temperature-0.1", "no-think", "contrastive-only")),
           "temperature-0.7-think-8-and-query": ("thoughts=think-8-and-query", ("no-think", "contrastive-only"))}


def test_committed_sampling_comparisons_render_as_the_readme_shows(capsys, tmp_path):
  """`python -m launch.report --comparisons`: the README's table of the drop-0.5 model's thoughts sampled otherwise is
  what the report prints from the committed comparisons, and the nDCG@10 it quotes are the committed summaries'."""
  files = [SAMPLING / run / f"compare-{against}.json" for run, (_, compared) in SAMPLED.items() for against in compared]
  assert report.main(["--comparisons", *map(str, files)]) is None
  table = capsys.readouterr().out
  assert len(re.findall(r"^\| think=\d \(temperature 0.7\)[^|]* vs ", table, re.M)) == len(files) == 8
  readme = (ROOT / "README.md").read_text()
  assert table in readme
  for run, (row, _) in SAMPLED.items():
    summary = json.loads((SAMPLING / run / "summary.json").read_text())
    assert f"{summary['metrics'][f'o1jax {row}']['ndcg@10']:.4f}" in readme
  # What the README says ran: thoughts sampled at 0.7 with top-p 1, and the third given the second's thoughts.
  settings = {run: json.loads((SAMPLING / run / "summary.json").read_text())["settings"] for run in SAMPLED}
  for run in ("temperature-0.7", "temperature-0.7-think-8"):
    assert (settings[run]["temperature"], settings[run]["top_p"], settings[run]["max_new_tokens"]) == (0.7, 1.0, 40)
  assert (settings["temperature-0.7"]["think"], settings["temperature-0.7-think-8"]["think"]) == (3, 8)
  assert settings["temperature-0.7-think-8-and-query"]["thoughts_from"] == [
      "think-8-and-query=runs/scifact-examples3-drop0.5/eval/trained-t0.7-k8/think_8_and_query.thoughts.jsonl"]
  (tmp_path / "compare.json").write_text(json.dumps({"names": ["a", "b"]}))
  with pytest.raises(ValueError, match=r"compare.json: not a JSON file of `python -m o1jax.eval.compare --json`"):
    report.main(["--comparisons", str(tmp_path / "compare.json")])
