"""`python -m launch.report --run=DIR [--out=DIR]`: a recipe run's results as one table and one figure.
`python -m launch.report --lever=NAME=DIR --lever=NAME=DIR ...`: several runs of the recipe (a lever each) side by
side in one table, nDCG@10, on the same test queries.
`python -m launch.report --run=DIR --publish=DIR`: copies what the report reads from a run (through the links
`recipe.sh --reuse` made) into a folder of its own and renders it there, as `launch/results` holds each run.
`python -m launch.report --comparisons JSON ...`: paired comparisons made outside a run (e.g. a run's checkpoint
evaluated with other sampling) as the run's report shows its own.

Reads what `launch/recipe.sh` (and `launch/scifact.sh`) leaves in the run directory:
  eval/<name>/summary.json     `python -m o1jax.eval --out` of each evaluated checkpoint (o1jax rows are labelled
                               "<name>, think=K" / "<name>, no thinking"; baselines are listed once)
  eval/<name>/compare-*.json   `python -m o1jax.eval.compare --json` of two of those runs (optional)
  diagnosis/quality.json       `python -m data_tools.diagnose`: how close each source's thoughts come to the relevant
                               documents (optional; eval/diagnosis holds the trained model's rows with those thoughts,
                               labelled "trained, thoughts=NAME")
  train_metrics.jsonl          the trainer's logged steps (`--config.log.jsonl`)
  train_contrastive_metrics.jsonl  the same for the model trained without thoughts (optional)
  stages/<stage>.seconds       the wall time of each stage
  stages/<stage>.reused        the run a stage's results were linked from (`recipe.sh --reuse`) instead
and writes results.md (the table, the paired comparisons with their commands, the thought-quality table, a few
queries' thoughts verbatim and the wall times, as pasted into the README) and results.png (training curves and nDCG@10 bars), printing the table. Run it from the repository
root.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence

from o1jax.files import atomic_write_text, publish_directory

MEASURES = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@100", "Recall@100"))
STAGE_ORDER = ("thoughts", "convert", "untrained", "train", "trained", "train_contrastive", "contrastive", "diagnose",
               "diagnosis")
# Table order of the evaluated checkpoints (eval/<name>): the thinking model, its ablation, then the start point.
FOLDER_ORDER = ("trained", "diagnosis", "contrastive-only", "untrained")
# eval/diagnosis evaluates the trained checkpoint with thoughts given to it.
CHECKPOINT_OF = {"diagnosis": "trained"}
# What each source of `data_tools.diagnose` is, for the legend under the table.
SOURCES = {"query": "the query text itself, as if it were the thought",
           "expert": "the expert's first candidate (what it writes without seeing any label)",
           "expert-random": "every candidate of the expert (the mean: a candidate drawn at random)",
           "expert-chosen": "the committee's choice among the expert's candidates; the committee compared them with a "
                            "relevant document, so this one is label-informed",
           "trained": "the trained model's own thoughts, the 3 per query it was evaluated with",
           "oracle": "the first words of a relevant document: an upper bound, not a system"}
EXAMPLES = 3  # queries whose thoughts the report shows verbatim
# What a published run keeps: every file the report reads, and the shards' manifest (which training data it was).
# Not the checkpoints, embeddings, shards or the expert's candidates: large, and no figure is read from them.
PUBLISHED = ("stages/*", "eval/*/summary.json", "eval/*/compare-*.json", "eval/trained/o1jax_think_3.thoughts.jsonl",
             "diagnosis/quality.json", "diagnosis/expert.thoughts.jsonl", "diagnosis/expert-chosen.thoughts.jsonl",
             "diagnosis/oracle.thoughts.jsonl", "thoughts/manifest.json", "train_metrics.jsonl",
             "train_contrastive_metrics.jsonl")
# What the report quotes of a comparison, all written by `python -m o1jax.eval.compare --json`.
COMPARISON_KEYS = ("names", "measure", "queries", "wins", "ties", "losses", "mean_a", "mean_b", "mean_difference",
                   "confidence", "ci_low", "ci_high", "randomization_pvalue", "t_pvalue", "command")


@dataclasses.dataclass
class RunResults:
  rows: dict[str, dict[str, float]]  # system -> measure -> value, in table order
  steps: list[dict[str, float]]  # the logged training steps
  stage_seconds: dict[str, int]
  ours: list[str]  # the rows of o1jax checkpoints (the others are baselines)
  contrastive_steps: list[dict[str, float]]  # the logged steps of the model trained without thoughts, if any
  comparisons: list[dict]  # `python -m o1jax.eval.compare --json` results, if any
  quality: dict | None = None  # diagnosis/quality.json, if any
  examples: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {"query", source: its first thought}
  reused: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> the run it was linked from


def _label(folder: str, system: str) -> str | None:
  """The table label of an o1jax row, or None for a baseline."""
  checkpoint = CHECKPOINT_OF.get(folder, folder)
  if system == "o1jax no-think":
    return f"{checkpoint}, no thinking"
  match = re.fullmatch(r"o1jax (think|thoughts)=(.+)", system)
  return f"{checkpoint}, {match.group(1)}={match.group(2)}" if match else None


def collect(run: str | pathlib.Path) -> RunResults:
  """Everything `render_markdown` and `render_figure` need, from a run directory."""
  run = pathlib.Path(run)
  summaries = sorted(run.glob("eval/*/summary.json"), key=lambda p: _rank(p.parent.name, FOLDER_ORDER))
  if not summaries:
    raise FileNotFoundError(f"{run}/eval/*/summary.json: no evaluation results")
  ours: dict[str, dict[str, float]] = {}
  baselines: dict[str, dict[str, float]] = {}
  for path in summaries:
    try:
      metrics = json.loads(path.read_text())["metrics"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{path}: not a summary.json of `python -m o1jax.eval --out` ({e})") from e
    # summary.json keys are sorted; rows with thinking come first, as `python -m o1jax.eval` prints them.
    for system, values in sorted(metrics.items(), key=lambda kv: kv[0] == "o1jax no-think"):
      label = _label(path.parent.name, system)
      if label is None:
        baselines.setdefault(system, values)
      else:
        ours.setdefault(label, values)
  seconds = {p.stem: int(p.read_text()) for p in (run / "stages").glob("*.seconds")}
  seconds = {name: seconds[name] for name in sorted(seconds, key=lambda name: _rank(name, STAGE_ORDER))}
  reused = {p.stem: p.read_text().strip() for p in sorted((run / "stages").glob("*.reused"),
                                                          key=lambda p: _rank(p.stem, STAGE_ORDER))}
  comparisons = [_comparison(path) for path in sorted(run.glob("eval/*/compare-*.json"),
                                                      key=lambda p: (_rank(p.parent.name, FOLDER_ORDER), p.name))]
  quality_path = run / "diagnosis" / "quality.json"
  quality = _json_file(quality_path, "python -m data_tools.diagnose") if quality_path.exists() else None
  return RunResults({**ours, **baselines}, _logged_steps(run / "train_metrics.jsonl"), seconds, list(ours),
                    _logged_steps(run / "train_contrastive_metrics.jsonl"), comparisons, quality, _examples(run),
                    reused)


def _json_file(path: pathlib.Path, writer: str) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a JSON file of `{writer}` ({e})") from e


def _examples(run: pathlib.Path) -> list[dict[str, str]]:
  """The first EXAMPLES queries of the trained model's thoughts file with its first thought and the first of every
  diagnosis source that has a thoughts file."""
  files = {"trained model": run / "eval" / "trained" / "o1jax_think_3.thoughts.jsonl",
           **{source: run / "diagnosis" / f"{source}.thoughts.jsonl" for source in ("expert", "expert-chosen")}}
  if not files["trained model"].exists():
    return []
  read = {name: [json.loads(line) for line in path.read_text().splitlines()[:EXAMPLES]]
          for name, path in files.items() if path.exists()}
  examples = []
  for i, record in enumerate(read["trained model"]):
    example = {"query": record["query"]}
    for name, records in read.items():
      if i < len(records) and records[i]["query_id"] == record["query_id"]:
        example[name] = records[i]["thoughts"][0]
    examples.append(example)
  return examples


def _rank(name: str, order: Sequence[str]) -> tuple[int, str]:
  """Sort key: names of `order` in its order, then any others alphabetically."""
  return (order.index(name) if name in order else len(order), name)


def _comparison(path: pathlib.Path) -> dict:
  comparison = _json_file(path, "python -m o1jax.eval.compare --json")
  missing = [key for key in COMPARISON_KEYS if key not in comparison] if isinstance(comparison, dict) else ["keys"]
  if missing:
    raise ValueError(f"{path}: not a JSON file of `python -m o1jax.eval.compare --json` (no {', '.join(missing)})")
  return comparison


def _logged_steps(log: pathlib.Path) -> list[dict[str, float]]:
  """The trainer's JSONL log, one record per step; [] when there is none."""
  steps = []
  if log.exists():
    for number, line in enumerate(log.read_text().splitlines(), 1):
      try:
        steps.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{log}:{number}: not a JSON line ({e})") from e
  # A resumed training run logs the steps after its checkpoint again: the last record of a step wins.
  return sorted({int(s["step"]): s for s in steps}.values(), key=lambda s: s["step"])


def render_markdown(results: RunResults) -> str:
  lines = ["| system | " + " | ".join(title for _, title in MEASURES) + " |",
           "|---|" + "---:|" * len(MEASURES)]
  for system, values in results.rows.items():
    lines.append(f"| {system} | " + " | ".join(f"{values[m]:.4f}" if m in values else "-" for m, _ in MEASURES)
                 + " |")
  if results.comparisons:
    lines += ["", *comparison_lines(results.comparisons)]
  if results.quality:
    lines += _quality_lines(results.quality)
  if results.examples:
    lines += ["", f"Thoughts, verbatim, for the first {len(results.examples)} test queries (the trained model's first "
                  "of 3; the expert's):"]
    for example in results.examples:
      lines += ["", f"- query: {_quote(example['query'])}"]
      lines += [f"  - {name}: {_quote(text)}" for name, text in example.items() if name != "query"]
  if results.stage_seconds:
    total = sum(results.stage_seconds.values())
    times = ", ".join(f"{name} {s / 60:.1f}" for name, s in results.stage_seconds.items())
    lines += ["", f"Wall time: {total / 60:.1f} min ({times})."]
  for origin in dict.fromkeys(results.reused.values()):
    names = ", ".join(name for name, run in results.reused.items() if run == origin)
    lines += ["", f"Reused from `{origin}` (its results, not run again here): {names}."]
  if results.steps:
    last = results.steps[-1]
    lines += ["", f"Training: {int(last['step'])} steps; last step loss_ctr {last['loss_ctr']:.4f}, "
                  f"loss_gen {last['loss_gen']:.4f}, in-batch top-1 accuracy {last['acc_top1']:.3f}."]
  if results.contrastive_steps:
    last = results.contrastive_steps[-1]
    lines += ["", f"Training without thoughts: {int(last['step'])} steps; last step loss_ctr {last['loss_ctr']:.4f}, "
                  f"in-batch top-1 accuracy {last['acc_top1']:.3f}."]
  return "\n".join(lines) + "\n"


def comparison_lines(comparisons: Sequence[dict]) -> list[str]:
  """The paired comparisons as a table, then the commands that made them."""
  lines = ["Paired comparisons (`python -m o1jax.eval.compare`: randomization test over sign flips, paired t-test):", "",
           "| A vs B | measure | queries | wins / ties / losses | mean A - B | CI | randomization p | t-test p |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for c in comparisons:
    interval = "-" if c["ci_low"] is None else f"{c['ci_low']:+.4f} to {c['ci_high']:+.4f} ({c['confidence']:.0%})"
    t_p = "-" if c["t_pvalue"] is None else f"{c['t_pvalue']:.4f}"
    lines.append(f"| {c['names'][0]} vs {c['names'][1]} | {c['measure']} | {c['queries']} | "
                 f"{c['wins']} / {c['ties']} / {c['losses']} | {c['mean_difference']:+.4f} | {interval} | "
                 f"{c['randomization_pvalue']:.4f} | {t_p} |")
  return lines + ["", "```bash", *(c["command"] for c in comparisons), "```"]


def _quote(text: str) -> str:
  return "“" + " ".join(text.split()).replace("|", "\\|") + "”"


def _quality_lines(quality: dict) -> list[str]:
  """The thought-quality table of `data_tools.diagnose`, its legend and the committee's view of its choice."""
  lines = ["", f"Thought quality on the same {quality['queries']} test queries (`python -m data_tools.diagnose`; "
               "MiniLM cosine with the query's first relevant document; share of a thought's words found in a "
               "relevant document; relevant-document words a thought adds that the query lacks):", "",
           "| thoughts | per query | words | MiniLM cosine | words in a relevant doc | new relevant words |",
           "|---|---:|---:|---:|---:|---:|"]
  sources = quality["sources"]
  order = [name for name in SOURCES if name in sources and name != "oracle"]
  order += sorted(name for name in sources if name not in SOURCES) + ["oracle"] * ("oracle" in sources)
  for name in order:
    q = sources[name]
    lines.append(f"| {name} | {q['thoughts_per_query']:.1f} | {q['words']:.1f} | {q['minilm_cosine']:.3f} | "
                 f"{q['share_in_relevant']:.3f} | {q['new_relevant_words']:.2f} |")
  lines += ["", *(f"- {name}: {SOURCES.get(name, 'a thoughts file given to the diagnosis (--score)')}"
                  for name in order)]
  committee = quality["committee"]
  members = ", ".join(f"{name} {view['chosen']:.2f} vs {view['random']:.2f}" for name, view in committee.items()
                      if isinstance(view, dict))
  lines += ["", f"The committee's choice among the expert's {quality['k']} candidates against a random one (mean "
                f"member score): {members}; the first candidate won {committee['first_candidate_won']:.0%} of the "
                "votes.", "", "```bash", quality["command"], "```"]
  return lines


def _difference(results: RunResults, names: list[str]) -> str:
  """'+0.0123 (p 0.0456)' of the comparison between `names`, by its randomization test; '-' if there is none."""
  for c in results.comparisons:
    if c["names"] == names:
      return f"{c['mean_difference']:+.4f} (p {c['randomization_pvalue']:.4f})"
  return "-"


def render_levers(runs: dict[str, RunResults]) -> str:
  """One row per run: (a) with and without thinking, (b), the paired differences that decide whether thinking
  helps, (a) given the expert's thoughts (its first candidate, and the committee's label-informed choice), and how
  close those and (a)'s own thoughts come to a relevant document."""
  def ndcg(results: RunResults, row: str) -> str:
    value = results.rows.get(row, {}).get("ndcg@10")
    return "-" if value is None else f"{value:.4f}"

  def cosine(results: RunResults, source: str) -> str:
    quality = (results.quality or {}).get("sources", {}).get(source)
    return "-" if quality is None else f"{quality['minilm_cosine']:.3f}"

  lines = ["| run | (a) think=3 | (a) no thinking | (b) contrastive-only | think - no thinking | think - (b) | "
           "(a) + expert's thoughts | (a) + committee's choice | MiniLM cosine: expert's thoughts | "
           "committee's choice | (a)'s thoughts |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in runs.items():
    lines.append(f"| {name} | {ndcg(r, 'trained, think=3')} | {ndcg(r, 'trained, no thinking')} | "
                 f"{ndcg(r, 'contrastive-only, no thinking')} | {_difference(r, ['think=3', 'no-think'])} | "
                 f"{_difference(r, ['think=3', 'contrastive-only'])} | {ndcg(r, 'trained, thoughts=expert')} | "
                 f"{ndcg(r, 'trained, thoughts=expert-chosen')} | {cosine(r, 'expert')} | "
                 f"{cosine(r, 'expert-chosen')} | {cosine(r, 'trained')} |")
  return "\n".join(lines) + "\n"


def render_figure(results: RunResults, path: str | pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel (only the report needs it)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
  if results.steps:
    x = [s["step"] for s in results.steps]
    for key, color in (("loss_ctr", "tab:blue"), ("loss_gen", "tab:orange")):
      curves.plot(x, [s[key] for s in results.steps], label=key, color=color)
    if results.contrastive_steps:
      curves.plot([s["step"] for s in results.contrastive_steps], [s["loss_ctr"] for s in results.contrastive_steps],
                  label="loss_ctr, no thoughts", color="tab:purple")
    curves.set_xlabel("step")
    curves.set_ylabel("loss")
    accuracy = curves.twinx()
    accuracy.plot(x, [s["acc_top1"] for s in results.steps], label="in-batch top-1 acc", color="tab:green",
                  linestyle="--")
    accuracy.set_ylabel("accuracy")
    accuracy.set_ylim(0, 1)
    handles = curves.get_legend_handles_labels()[0] + accuracy.get_legend_handles_labels()[0]
    curves.legend(handles, [h.get_label() for h in handles], loc="upper right")
  curves.set_title("training")
  names = list(results.rows)
  values = [results.rows[n].get("ndcg@10", 0.0) for n in names]
  colors = ["tab:blue" if n in results.ours else "tab:gray" for n in names]
  drawn = bars.barh(range(len(names)), values, color=colors)
  bars.bar_label(drawn, fmt="%.3f", padding=3)
  bars.set_yticks(range(len(names)), names)
  bars.invert_yaxis()
  bars.set_xlim(0, max(values + [0.1]) * 1.2)
  bars.set_xlabel("nDCG@10")
  bars.set_title("test queries")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(results: RunResults, out: pathlib.Path) -> str:
  """results.md and results.png in `out`; returns the markdown."""
  markdown = render_markdown(results)
  atomic_write_text(out / "results.md", markdown)
  render_figure(results, out / "results.png")
  return markdown


def _is_published(relative: pathlib.PurePath) -> bool:
  """Whether a file at this path inside a folder is one `publish` writes."""
  return any(len(relative.parts) == len(pathlib.PurePath(pattern).parts) and relative.match(pattern)
             for pattern in (*PUBLISHED, "results.md", "results.png"))


def publish(run: str | pathlib.Path, out: str | pathlib.Path) -> RunResults:
  """Copies the PUBLISHED files of `run` (as real files, wherever its links point) into `out` with its report.
  Staged beside `out` and renamed into place, so an interrupted copy leaves any earlier `out` as it was. An
  existing `out` is replaced only when it holds nothing but what a publish writes: never a run (its checkpoints),
  nor a folder of other results."""
  run, out = pathlib.Path(run), pathlib.Path(out)
  collect(run)  # a folder the report cannot read is refused before anything is written
  if out.exists():
    foreign = sorted(p for p in out.rglob("*")
                     if p.is_symlink() or (not p.is_dir() and not _is_published(p.relative_to(out))))
    if foreign:
      raise ValueError(f"--publish={out} holds {foreign[0]}, which a publish does not write (the folder would be "
                       "replaced): give a new folder")
  out.parent.mkdir(parents=True, exist_ok=True)
  staged = out.parent / f".{out.name}.staging-{os.getpid()}"
  shutil.rmtree(staged, ignore_errors=True)
  try:
    for pattern in PUBLISHED:
      for path in sorted(run.glob(pattern)):
        target = staged / path.relative_to(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    results = collect(staged)
    write_report(results, staged)
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    raise
  publish_directory(staged, out)
  return results


def main(argv: Sequence[str]) -> RunResults | None:
  p = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__.splitlines()[0])
  runs = p.add_mutually_exclusive_group(required=True)
  runs.add_argument("--run", help="the run directory of launch/recipe.sh")
  runs.add_argument("--lever", action="append", metavar="NAME=DIR", help="repeatable: a run to set beside the others")
  runs.add_argument("--comparisons", nargs="+", metavar="JSON",
                    help="files of `python -m o1jax.eval.compare --json`, made outside a run, as one table")
  p.add_argument("--out", help="with --run: where results.md and results.png go (default: the run directory)")
  p.add_argument("--publish", metavar="DIR",
                 help="with --run: copy what the report reads into DIR (replacing it) and write the report there")
  args = p.parse_args(argv)
  if (args.publish or args.out) and not args.run:
    p.error("--out and --publish go with --run")
  if args.publish and args.out:
    p.error("--publish writes its report into DIR: give --out or --publish, not both")
  if args.comparisons:
    print("\n".join(comparison_lines([_comparison(pathlib.Path(path)) for path in args.comparisons])))
    return None
  if args.lever:
    named = [entry.partition("=")[::2] for entry in args.lever]
    for entry, (name, directory) in zip(args.lever, named):
      if not name or not directory:
        p.error(f"--lever={entry}: expected NAME=DIR")
    print(render_levers({name: collect(directory) for name, directory in named}), end="")
    return None
  if args.publish:
    out = pathlib.Path(args.publish)
    results = publish(args.run, out)
    markdown = (out / "results.md").read_text()
  else:
    results = collect(args.run)
    out = pathlib.Path(args.out or args.run)
    out.mkdir(parents=True, exist_ok=True)
    markdown = write_report(results, out)
  print(markdown, end="")
  print(f"wrote {out / 'results.md'} and {out / 'results.png'}")
  return results


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
