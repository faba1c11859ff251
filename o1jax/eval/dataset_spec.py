"""Datasets named on the command line: a BEIR directory or loose corpus / queries / qrels files, each with a suite.

  DIR                                        a BEIR directory (corpus.jsonl[.gz], queries.jsonl[.gz],
                                             qrels/<split>.tsv[.gz]), named by its folder name
  NAME=DIR[,split:SPLIT][,suite:SUITE]       the same, named NAME
  NAME=corpus:PATH,queries:PATH,qrels:PATH[,suite:SUITE]
                                             loose files: corpus and queries as jsonl or tsv (by extension:
                                             `.tsv`/`.txt` are tsv, MS MARCO's collection.tsv and TREC topics),
                                             qrels as BEIR tsv or TREC 4-column

NAME is letters, digits, `.`, `_`, `-` (it names the output folder). The suite (`suites.SUITES`) is `suite:` or
the caller's default, else `suites.suite_for_name(NAME)`. `parse` checks everything a spec names exists and raises
ValueError naming the option; `load` reads the data (a malformed file is named with its line and field).
Paths holding a comma cannot be given in a spec (a directory that exists is taken whole).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from o1jax.data import readers
from o1jax.data.readers import BeirDataset, load_files
from o1jax.eval import suites

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_KEYS = ("corpus", "queries", "qrels")
_KEYS = (*_FILE_KEYS, "split", "suite")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  suite: suites.Suite
  corpus: str
  queries: str
  qrels: str
  source: str  # the directory (with its split) or the files, for the summary

  def load(self) -> BeirDataset:
    return load_files(self.corpus, self.queries, self.qrels, self.suite.require_judged_docs)


def _existing(option: str, directory: str, stem: str) -> str:
  try:
    return str(readers.find_file(pathlib.Path(directory), stem))
  except FileNotFoundError as e:
    raise ValueError(f"{option}: {e}") from None


def _suite(option: str, name: str, given: str | None, default: str | None) -> suites.Suite:
  chosen = given or default
  if chosen is None:
    return suites.suite_for_name(name)
  if chosen not in suites.SUITES:
    raise ValueError(f"{option}: unknown suite {chosen!r}; one of {', '.join(suites.SUITES)}")
  return suites.SUITES[chosen]


def from_files(option: str, name: str, corpus: str, queries: str, qrels: str, suite: str | None = None,
               default_suite: str | None = None) -> DatasetSpec:
  """A dataset of loose files; raises ValueError naming `option` when a file is missing."""
  if not _NAME.fullmatch(name):
    raise ValueError(f"{option}: dataset name {name!r} must be letters, digits, '.', '_' or '-'")
  for key, path in zip(_FILE_KEYS, (corpus, queries, qrels)):
    if not os.path.isfile(path):
      raise ValueError(f"{option}: {key} {path}: no such file")
  return DatasetSpec(name, _suite(option, name, suite, default_suite), corpus, queries, qrels,
                     f"corpus:{corpus},queries:{queries},qrels:{qrels}")


def from_directory(option: str, name: str, directory: str, split: str, suite: str | None = None,
                   default_suite: str | None = None) -> DatasetSpec:
  """A BEIR directory's split; raises ValueError naming `option` when the directory or a file is missing."""
  if not _NAME.fullmatch(name):
    raise ValueError(f"{option}: dataset name {name!r} must be letters, digits, '.', '_' or '-' (give NAME=DIR)")
  if not os.path.isdir(directory):
    raise ValueError(f"{option}: no such directory")  # a spec names one directory
  return DatasetSpec(name, _suite(option, name, suite, default_suite), _existing(option, directory, "corpus.jsonl"),
                     _existing(option, directory, "queries.jsonl"),
                     _existing(option, os.path.join(directory, "qrels"), f"{split}.tsv"), f"{directory},split:{split}")


def parse(option: str, value: str, split: str, default_suite: str | None = None) -> DatasetSpec:
  """One `--dataset` value (see the module docstring); `split` and `default_suite` apply where it names none."""
  where = f"{option}={value}"
  name, equals, rest = value.partition("=")
  if not equals or not _NAME.fullmatch(name) or os.path.isdir(value):
    name, rest = None, value
  items = [rest] if os.path.isdir(rest) else rest.split(",")
  directory, fields = None, {}
  for i, item in enumerate(items):
    key, colon, field = item.partition(":")
    if colon and key in _KEYS:
      if key in fields:
        raise ValueError(f"{where}: {key}: given twice")
      if not field:
        raise ValueError(f"{where}: {key}: is empty")
      fields[key] = field
    elif i == 0 and item:
      directory = item
    else:
      raise ValueError(f"{where}: {item!r} is neither the directory (first) nor one of "
                       f"{', '.join(k + ':' for k in _KEYS)}")
  files = [k for k in _FILE_KEYS if k in fields]
  if directory is not None:
    if files:
      raise ValueError(f"{where}: a BEIR directory or corpus:/queries:/qrels: files, not both")
    name = name or os.path.basename(os.path.normpath(directory))
    return from_directory(where, name, directory, fields.get("split", split), fields.get("suite"), default_suite)
  missing = [k for k in _FILE_KEYS if k not in fields]
  if missing:
    raise ValueError(f"{where}: loose files need {', '.join(k + ':' for k in missing)} too")
  if "split" in fields:
    raise ValueError(f"{where}: split: names a BEIR directory's qrels; loose files give qrels: instead")
  if name is None:
    raise ValueError(f"{where}: name loose files: NAME=corpus:...,queries:...,qrels:...")
  return from_files(where, name, fields["corpus"], fields["queries"], fields["qrels"], fields.get("suite"),
                    default_suite)
