"""The expert and committee options of the data tools, and the objects they describe.

`python -m data_tools.synthesize` and `python -m data_tools.ingest` take the same exploration options (`--expert`,
`--model`, `--k`, sampling, HTTP settings) and committee options (`--members`, `--st_model`, `--member_weights`,
`--vote`) with the same meaning and defaults: `add_expert_options` / `add_committee_options` define them on a
parser, `check_expert_options` / `check_committee_options` reject bad values with an argparse error naming the
option (exit status 2, before anything loads), and `make_expert`, `make_prompt_builder`, `make_committee` build
what they describe. `EXPERT_RUNTIME_ONLY` names the options that do not change a tool's output (a restart may
change them; they are left out of the output directory's pinned config).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from data_tools import explore
from data_tools.committee import BM25Member, Committee, Member, sentence_transformer_member
from data_tools.inputs import TrainQuery

MEMBERS = ("bm25", "st")
# An unavailable expert stops a shard-writing command resumably (`shards.write_shards`), and ends the command line
# with one line like bad input (`shards.run_command`).
EXPERT_RETRY = {"retry_errors": (explore.ExpertUnavailable,), "retry_hint": " once the expert answers"}
EXPERT_ERRORS = (ValueError, OSError, explore.ExpertError)
EXPERT_RUNTIME_ONLY = ("concurrency", "timeout_s", "max_attempts", "api_key_env", "base_url")


def add_expert_options(p: argparse.ArgumentParser, model_required: bool) -> None:
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--k", type=int, default=3, help="candidate thoughts per query")
  p.add_argument("--num_examples", type=int, default=3, help="in-context (query, positive) pairs per prompt")
  p.add_argument("--example_max_words", type=int, default=64)
  p.add_argument("--expert", choices=("local", "http"), default="local")
  p.add_argument("--model", required=model_required, help="local: .gguf file or HF dir; http: the served model name")
  p.add_argument("--base_url", help="http: e.g. http://127.0.0.1:8000/v1")
  p.add_argument("--api_key_env", help="http: name of the env var that holds the API key")
  p.add_argument("--concurrency", type=int, default=8)
  p.add_argument("--timeout_s", type=float, default=120.0)
  p.add_argument("--max_attempts", type=int, default=5)
  p.add_argument("--max_new_tokens", type=int, default=512)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--batch_size", type=int, default=8, help="local: prompts per generation batch")


def add_committee_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--members", default="bm25,st", help="comma list of bm25, st (sentence-transformers)")
  p.add_argument("--st_model", default=None, help="sentence-transformers model (default: offline MiniLM)")
  p.add_argument("--member_weights", default=None, help="comma list of floats, one per member")
  p.add_argument("--vote", choices=("soft", "hard"), default="soft")


def check_ranges(p: argparse.ArgumentParser, args: argparse.Namespace,
                 checks: Sequence[tuple[str, bool, str]]) -> None:
  """`p.error` for the first (option, ok, what it must be) that is not ok."""
  for option, ok, want in checks:
    if not ok:
      p.error(f"--{option} must be {want}, got {getattr(args, option)}")


def check_expert_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  check_ranges(p, args, [
      ("k", args.k >= 1, ">= 1"), ("num_examples", args.num_examples >= 0, ">= 0"),
      ("example_max_words", args.example_max_words >= 1, ">= 1"), ("concurrency", args.concurrency >= 1, ">= 1"),
      ("timeout_s", 0 < args.timeout_s < float("inf"), "a positive number of seconds"),
      ("max_attempts", args.max_attempts >= 1, ">= 1"), ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
      ("temperature", 0 <= args.temperature < float("inf"), ">= 0"), ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
      ("batch_size", args.batch_size >= 1, ">= 1")])
  if args.expert == "http" and not args.base_url:
    p.error("--expert=http needs --base_url")


def check_committee_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  members = args.members.split(",")
  unknown = [m for m in members if m not in MEMBERS]
  if unknown or len(set(members)) != len(members):
    p.error(f"--members must name distinct members among {', '.join(MEMBERS)}, got {args.members!r}")
  if args.member_weights is not None:
    try:
      weights = [float(w) for w in args.member_weights.split(",")]
    except ValueError:
      weights = []
    if (len(weights) != len(members) or not all(0 <= w < float("inf") for w in weights) or not sum(weights)):
      p.error(f"--member_weights must be {len(members)} non-negative numbers, not all 0, one per member of "
              f"--members={args.members}, got {args.member_weights!r}")


def make_expert(args: argparse.Namespace) -> explore.Expert:
  if args.expert == "http":
    from data_tools.http_expert import HttpExpert, HttpExpertConfig  # pylint: disable=g-import-not-at-top
    return HttpExpert(HttpExpertConfig(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, concurrency=args.concurrency, timeout_s=args.timeout_s,
        max_attempts=args.max_attempts))
  from data_tools.local_expert import LocalExpert, LocalExpertConfig  # pylint: disable=g-import-not-at-top
  return LocalExpert.from_checkpoint(args.model, LocalExpertConfig(
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
      batch_size=args.batch_size, seed=args.seed))


def make_prompt_builder(args: argparse.Namespace, pool: Sequence[TrainQuery]) -> explore.PromptBuilder:
  """Exploration prompts drawing their in-context examples from `pool`."""
  try:
    return explore.PromptBuilder(pool, args.seed, args.num_examples, args.example_max_words)
  except ValueError as e:
    raise ValueError(f"--num_examples={args.num_examples}: {e}") from e


def make_committee(args: argparse.Namespace) -> Committee:
  members: list[Member] = []
  for name in args.members.split(","):
    if name == "bm25":
      members.append(BM25Member())
      continue
    try:
      members.append(sentence_transformer_member(args.st_model))
    except OSError as e:
      raise ValueError(f"--st_model={args.st_model}: cannot load the sentence-transformers model: {e}") from e
  weights = [float(w) for w in args.member_weights.split(",")] if args.member_weights else None
  return Committee(members, weights, args.vote)
