"""Faults and bad input on the evaluation side (issue 15): every `python -m o1jax.eval` option is checked before
the dataset or a model loads, with one line naming it; a failed write of `--out` still prints the table; an
embedding cache whose bytes were changed, truncated or replaced is never used (a warning, then the embeddings are
computed again), and one that cannot be written costs nothing but a warning."""
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from o1jax.eval import __main__ as eval_cli, dataset_spec
from o1jax.eval.baselines import __main__ as baselines_cli
from o1jax.retrieval import embedding_cache
from o1jax.retrieval.retriever import Retriever
from o1jax.tokenizer import load_tokenizer
from test_eval_cli import write_beir  # pylint: disable=wrong-import-order  (tests/ is on sys.path)
from test_retriever import tiny_model_dir  # pylint: disable=wrong-import-order

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ options checked before anything loads


def refuse(*args, **kwargs):
  raise AssertionError("loaded before every option was checked")


@pytest.fixture
def nothing_loads(monkeypatch):
  monkeypatch.setattr(dataset_spec, "load_files", refuse)
  monkeypatch.setattr(baselines_cli, "load_beir", refuse)
  monkeypatch.setattr(Retriever, "from_pretrained", refuse)


def read_only_place(tmp_path: pathlib.Path) -> pathlib.Path:
  """A directory that cannot be created: under a read-only directory, or, for root (whom permission bits do not
  stop), under /sys, which refuses new entries to everyone."""
  if os.geteuid() != 0:
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    return parent / "out"
  return pathlib.Path("/sys/o1jax-eval-out")


def bad_options(tmp_path):
  a_file = tmp_path / "a-file"
  a_file.write_text("not a directory\n")
  no_config = tmp_path / "not-a-model"
  no_config.mkdir()
  yield ["--checkpoint=/nonexistent/ckpt"], "--checkpoint=/nonexistent/ckpt: no such directory"
  yield [f"--dataset={a_file}"], f"--dataset={a_file}: no such directory"
  yield ["--temperature=-1"], "--temperature=-1.0: must be a finite number >= 0"
  yield ["--temperature=nan"], "--temperature=nan: must be a finite number >= 0"
  yield ["--top_p=2"], "--top_p=2.0: must be in (0, 1]"
  yield ["--top_p=0"], "--top_p=0.0: must be in (0, 1]"
  yield ["--max_new_tokens=0"], "--max_new_tokens=0: must be an integer >= 1"
  yield ["--max_queries=-1"], "--max_queries=-1: must be >= 0 (0 = all)"
  yield ["--k=0"], "--k=0: must be >= 1"
  yield ["--seed=-1"], "--seed=-1: must be in [0, 2**32)"
  yield [f"--seed={2 ** 32}"], f"--seed={2 ** 32}: must be in [0, 2**32)"
  yield ["--doc_tokens=2"], "--doc_tokens=2: must be >= 3"
  yield ["--baselines=bm25,bm26"], "--baselines: 'bm26' is neither bm25, minilm nor a sentence-transformers directory"
  yield ["--baselines=bm25,bm25"], "--baselines: 'bm25' gives the table row 'BM25' twice"
  yield [f"--baselines={no_config}"], f"--baselines: '{no_config}' has neither modules.json nor config.json"
  yield [f"--out={a_file}"], f"--out={a_file}: exists and is not a directory"
  yield [f"--out={a_file}/sub"], f"--out={a_file}/sub: cannot write there"
  place = read_only_place(tmp_path)
  yield [f"--out={place}"], f"--out={place}: cannot write there"
  yield [f"--cache_dir={a_file}"], f"--cache_dir={a_file}: exists and is not a directory"


def test_every_option_is_checked_before_anything_loads(tmp_path, nothing_loads):
  dataset = write_beir(tmp_path / "beir", {"d1": ("", "text")}, {"q1": "query"}, {"q1": {"d1": 1}})
  base = [f"--checkpoint={tmp_path}", f"--dataset={dataset}"]
  for args, message in bad_options(tmp_path):
    with pytest.raises(ValueError) as raised:
      eval_cli.main(base + args)
    assert message in str(raised.value), args
  # The same options, valid, pass the checks and reach the first load.
  with pytest.raises(AssertionError, match="loaded before"):
    eval_cli.main(base + ["--temperature=0", "--top_p=1", "--max_queries=0", "--seed=4294967295", "--baselines=",
                          f"--out={tmp_path / 'new' / 'out'}"])
  assert (tmp_path / "new" / "out").is_dir()


def test_the_baselines_cli_checks_its_options_first(tmp_path, nothing_loads):
  a_file = tmp_path / "a-file"
  a_file.write_text("")
  cases = [([f"--dataset={a_file}"], f"--dataset={a_file}: no such directory"),
           (["--k=0"], "--k=0: must be >= 1"),
           ([f"--model={tmp_path}"], f"--model: '{tmp_path}' has neither modules.json nor config.json"),
           ([f"--out={a_file}"], f"--out={a_file}: exists and is not a directory")]
  for args, message in cases:
    with pytest.raises(ValueError) as raised:
      baselines_cli.main([f"--dataset={tmp_path}", *args])
    assert message in str(raised.value), args
  with pytest.raises(AssertionError, match="loaded before"):
    baselines_cli.main([f"--dataset={tmp_path}", f"--out={tmp_path / 'out'}"])


def test_the_cli_answers_with_one_line_and_exit_1(tmp_path):
  dataset = write_beir(tmp_path / "beir", {"d1": ("", "text")}, {"q1": "query"}, {"q1": {"d1": 1}})
  proc = subprocess.run([sys.executable, "-m", "o1jax.eval", f"--checkpoint={tmp_path}", f"--dataset={dataset}",
                         "--top_p=2"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == "error: --top_p=2.0: must be in (0, 1] (1 = no nucleus cut)"
  assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the embedding cache


class CountingEncoder:
  def __init__(self, dim=4):
    self.calls, self.dim = 0, dim

  def __call__(self, texts):
    self.calls += 1
    return np.stack([np.arange(self.dim, dtype=np.float32) + len(t) for t in texts])


TEXTS = ["a", "bb", "ccc"]
SETTINGS = ("test-encoder", "v1")


def entry(cache_dir, texts=TEXTS):
  key = embedding_cache.cache_key(SETTINGS, texts)
  return cache_dir / f"{key}.npy", cache_dir / f"{key}.json"


def flip_bytes(path):
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF  # inside the last vector: still a well-formed .npy of the right shape
  path.write_bytes(bytes(data))


def truncate(path):
  path.write_bytes(path.read_bytes()[:-8])


def garbage(path):
  path.write_bytes(b"\x93NUMPY garbage")


def other_entry(path):
  """The .npy and checksum of another corpus of the same shape, copied over this one: both self-consistent."""
  other_npy, other_json = entry(path.parent, ["x", "yy", "zzz"])
  shutil.copy(other_npy, path)
  shutil.copy(other_json, path.with_suffix(".json"))


def other_vectors(path):
  """A valid .npy of the right shape and dtype whose vectors are not the encoder's."""
  np.save(path, np.ones((len(TEXTS), 4), np.float32), allow_pickle=False)


def no_checksum(path):
  path.with_suffix(".json").unlink()


def bad_checksum_file(path):
  path.with_suffix(".json").write_bytes(b"\xff{")


def directory(path):
  path.unlink()
  path.mkdir()


@pytest.mark.parametrize("damage,reason", [
    (flip_bytes, "checksum mismatch"), (truncate, "checksum mismatch"), (garbage, "checksum mismatch"),
    (other_vectors, "checksum mismatch"), (other_entry, "belongs to another encoder or corpus"),
    (no_checksum, "no checksum file"), (bad_checksum_file, "unreadable checksum file"), (directory, "Is a directory")])
def test_a_damaged_cache_is_never_used(tmp_path, caplog, damage, reason):
  encoder = CountingEncoder()
  expected = encoder(TEXTS)
  embedding_cache.cached_encode(encoder, ["x", "yy", "zzz"], SETTINGS, tmp_path)  # another entry to copy from
  first = embedding_cache.cached_encode(encoder, TEXTS, SETTINGS, tmp_path)
  np.testing.assert_array_equal(first, expected)
  path, _ = entry(tmp_path)
  assert embedding_cache.cached_encode(encoder, TEXTS, SETTINGS, tmp_path) is not None and encoder.calls == 3
  damage(path)
  with caplog.at_level(logging.WARNING):
    again = embedding_cache.cached_encode(encoder, TEXTS, SETTINGS, tmp_path)
  np.testing.assert_array_equal(again, expected)
  assert encoder.calls == 4
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert str(path) in warning and reason in warning, warning
  if damage is not directory:  # a directory in the way cannot be replaced; the warning says so and nothing more
    caplog.clear()
    np.testing.assert_array_equal(embedding_cache.cached_encode(encoder, TEXTS, SETTINGS, tmp_path), expected)
    assert encoder.calls == 4 and not caplog.records  # rewritten: the next call loads it


def test_a_cache_that_cannot_be_written_costs_only_a_warning(tmp_path, caplog):
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  encoder = CountingEncoder()
  with caplog.at_level(logging.WARNING):
    vectors = embedding_cache.cached_encode(encoder, TEXTS, SETTINGS, blocker / "cache")
  np.testing.assert_array_equal(vectors, encoder(TEXTS))
  assert "could not be written" in caplog.text


def test_the_cache_is_a_plain_npy_with_its_checksum(tmp_path):
  vectors = embedding_cache.cached_encode(CountingEncoder(), TEXTS, SETTINGS, tmp_path)
  path, checksum = entry(tmp_path)
  np.testing.assert_array_equal(np.load(path, allow_pickle=False), vectors)
  assert json.loads(checksum.read_text()) == {"key": path.stem, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# ------------------------------------------------------------------ the CLI end to end on a tiny model


@pytest.fixture(scope="module")
def tiny(smollm2_gguf, tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  model = tiny_model_dir(load_tokenizer(smollm2_gguf), root / "hf", seed=2)
  corpus = {f"d{i}": ("", text) for i, text in enumerate(
      ["Scurvy is caused by a lack of vitamin C.", "Zinc lozenges and the common cold.", "Bone repair with "
       "nanoparticles.", "Vitamin D and fractures.", "Sleep and memory consolidation.", "Coffee and heart rhythm."])}
  queries = {"q1": "what causes scurvy?", "q2": "does zinc help colds?", "q3": "nanoparticles in bone"}
  dataset = write_beir(root / "beir", corpus, queries, {"q1": {"d0": 1}, "q2": {"d1": 1}, "q3": {"d2": 1}})
  return model, dataset, root


def test_a_failed_write_still_prints_the_table(tiny, tmp_path, monkeypatch, capsys):
  model, dataset, _ = tiny
  out = tmp_path / "out"
  evaluate_all = eval_cli.evaluate_all

  def then_lose_the_directory(args):
    results = evaluate_all(args)
    out.rmdir()  # a disk unmounted, a directory cleaned up: --out passed its check and is gone now
    out.write_text("")
    return results
  monkeypatch.setattr(eval_cli, "evaluate_all", then_lose_the_directory)
  with pytest.raises(OSError, match=f"--out={out}: writing the results failed .*; the table above is complete"):
    eval_cli.main([f"--checkpoint={model}", f"--dataset={dataset}", "--think=off", "--baselines=bm25",
                   "--search=exact", f"--out={out}", f"--cache_dir={tmp_path / 'cache'}"])
  printed = capsys.readouterr().out
  assert "o1jax no-think" in printed and "BM25" in printed and "ndcg@10" in printed


def test_a_replaced_document_cache_is_recomputed_end_to_end(tiny, tmp_path, caplog):
  model, dataset, _ = tiny
  cache = tmp_path / "cache"
  args = [f"--checkpoint={model}", f"--dataset={dataset}", "--think=off", "--baselines=", "--search=exact",
          f"--cache_dir={cache}"]
  first = eval_cli.main(args)["beir"]["o1jax no-think"]
  (npy,) = cache.glob("*.npy")
  vectors = np.load(npy)
  # Vectors that favour the wrong documents: used as is, they would change the run.
  np.save(npy, np.roll(vectors, 1, axis=0), allow_pickle=False)
  with caplog.at_level(logging.WARNING):
    second = eval_cli.main(args)["beir"]["o1jax no-think"]
  assert "checksum mismatch" in caplog.text and str(npy) in caplog.text
  assert second.run == first.run and second.metrics == first.metrics
  np.testing.assert_array_equal(np.load(npy), vectors)
