"""Paired comparison of two runs: the library against hand computations (every sign flip enumerated, the t
statistic, p-value and interval from closed forms), the CLI on small run files against pytrec_eval, published
DL19 runs against their published nDCG@10, and bad input named."""
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import pytrec_eval

from o1jax.eval.compare import compare
from o1jax.eval.compare.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def exact_randomization_p(differences):
  """P(|mean of sign-flipped differences| >= |observed mean|) over all 2^n flips. The test values are multiples of
  1/16, so every sum is exact and no tolerance is needed."""
  observed = abs(sum(differences))
  flips = itertools.product((1, -1), repeat=len(differences))
  return sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed for signs in flips) / 2 ** len(differences)


def hand_t(differences):
  n = len(differences)
  mean = sum(differences) / n
  sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
  return mean / (sd / math.sqrt(n)), sd


def test_three_queries_by_hand():
  a = {"q1": 0.75, "q2": 0.5, "q3": 0.25}
  b = {"q1": 0.25, "q2": 0.25, "q3": 0.375}
  differences = [0.5, 0.25, -0.125]
  result = compare(a, b, measure="ndcg@10", names=("x", "y"))
  assert (result.wins, result.ties, result.losses, result.queries) == (2, 0, 1, 3)
  assert result.mean_difference == pytest.approx(0.625 / 3)
  assert result.mean_a == pytest.approx(0.5) and result.mean_b == pytest.approx(0.875 / 3)
  t, sd = hand_t(differences)
  assert result.t_statistic == pytest.approx(t, rel=1e-12)
  # Student's t with 2 degrees of freedom has the CDF 1/2 + t / (2 sqrt(2 + t^2)): two-sided p = 1 - |t|/sqrt(2+t^2),
  # and its 0.975 quantile is 0.95 * sqrt(2 / (1 - 0.95^2)).
  assert result.t_pvalue == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)
  half = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2)) * sd / math.sqrt(3)
  assert (result.ci_low, result.ci_high) == pytest.approx((0.625 / 3 - half, 0.625 / 3 + half), rel=1e-9)
  assert result.randomization_exact and result.permutations == 8
  assert result.randomization_pvalue == exact_randomization_p(differences) == 0.5


def test_six_queries_with_a_tie_exact_randomization():
  a = {f"q{i}": v / 16 for i, v in enumerate([8, 5, 14, 2, 7, 11])}
  b = {f"q{i}": v / 16 for i, v in enumerate([3, 5, 8, 4, 1, 10])}
  differences = [a[q] - b[q] for q in sorted(a)]
  result = compare(a, b)
  assert (result.wins, result.ties, result.losses) == (4, 1, 1)
  assert result.t_statistic == pytest.approx(hand_t(differences)[0], rel=1e-12)
  assert result.randomization_exact and result.permutations == 64
  assert result.randomization_pvalue == pytest.approx(exact_randomization_p(differences), abs=1e-15)
  assert result.randomization_pvalue == pytest.approx(12 / 64)  # the count, worked out once on paper


def test_random_sign_flips_approach_the_exact_p_and_are_reproducible():
  rng = np.random.default_rng(3)
  a = {f"q{i:02d}": int(v) / 16 for i, v in enumerate(rng.integers(0, 17, 16))}
  b = {q: int(v) / 16 for q, v in zip(a, rng.integers(0, 17, 16))}
  differences = np.array([a[q] - b[q] for q in sorted(a)]) * 16  # integers: exact sums
  signs = 1 - 2 * ((np.arange(2 ** 16)[:, None] >> np.arange(16)) & 1)
  exact = np.mean(np.abs(signs @ differences) >= abs(differences.sum()))
  result = compare(a, b, permutations=4000, seed=7)
  assert not result.randomization_exact and result.permutations == 4000
  assert abs(result.randomization_pvalue - exact) < 4 * math.sqrt(exact * (1 - exact) / 4000) + 1 / 4001
  assert compare(a, b, permutations=4000, seed=7) == result
  # The flips follow the sorted query ids, not the dicts' order.
  assert compare(dict(reversed(a.items())), b, permutations=4000, seed=7) == result
  assert compare(a, b, permutations=2 ** 16).randomization_pvalue == pytest.approx(exact, abs=1e-15)


def test_equal_differences_leave_the_t_test_undefined():
  a = {"q1": 0.5, "q2": 0.25, "q3": 1.0}
  same = compare(a, a)
  assert (same.ties, same.randomization_pvalue, same.t_pvalue, same.ci_low) == (3, 1.0, None, None)
  shifted = compare(a, {q: v - 0.125 for q, v in a.items()})
  assert shifted.wins == 3 and shifted.t_statistic is None
  assert shifted.randomization_pvalue == pytest.approx(2 / 8)  # only all-plus and all-minus reach the observed mean


def test_library_rejects_bad_input():
  with pytest.raises(ValueError, match=r"x and y cover different queries: 1 only in x \('q3'\); 1 only in y \('q9'\)"):
    compare({"q1": 0.1, "q2": 0.2, "q3": 0.3}, {"q1": 0.1, "q2": 0.2, "q9": 0.3}, names=("x", "y"))
  with pytest.raises(ValueError, match="at least 2 queries"):
    compare({"q1": 0.1}, {"q1": 0.2})
  with pytest.raises(ValueError, match="B: query 'q2' has a non-finite value"):
    compare({"q1": 0.1, "q2": 0.2}, {"q1": 0.2, "q2": float("nan")})
  with pytest.raises(ValueError, match="confidence=1.5"):
    compare({"q1": 0.1, "q2": 0.2}, {"q1": 0.2, "q2": 0.3}, confidence=1.5)


# Three queries, one relevant doc each (q3 also a partly relevant one); A finds q1's at rank 1 and B at rank 2.
QRELS = {"q1": {"d1": 1}, "q2": {"d4": 1}, "q3": {"d7": 2, "d8": 1}}
RUN_A = {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "q2": {"d5": 3.0, "d4": 2.0}, "q3": {"d7": 5.0, "d8": 4.0}}
RUN_B = {"q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0}, "q2": {"d5": 3.0, "d4": 2.0}, "q3": {"d8": 5.0, "d7": 4.0}}


def write_run(path, run, tag="t"):
  lines = [f"{q} Q0 {d} {rank} {s} {tag}" for q, docs in run.items()
           for rank, (d, s) in enumerate(sorted(docs.items(), key=lambda x: -x[1]), 1)]
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture
def files(tmp_path):
  trec = tmp_path / "qrels.txt"
  trec.write_text("".join(f"{q} 0 {d} {g}\n" for q, docs in QRELS.items() for d, g in docs.items()))
  beir = tmp_path / "test.tsv"
  beir.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, docs in QRELS.items()
                                                            for d, g in docs.items()))
  return write_run(tmp_path / "a.trec", RUN_A), write_run(tmp_path / "b.trec", RUN_B), trec, beir


def test_cli_on_two_run_files(files, tmp_path, capsys):
  run_a, run_b, trec_qrels, beir_qrels = files
  out = tmp_path / "out" / "cmp.json"
  result = main([str(run_a), str(run_b), f"--qrels={trec_qrels}", f"--json={out}", "--names=new,old"])
  # By hand (trec_eval's gain is the grade itself): q1 nDCG@10 1 vs 1/log2(3); q2 1/log2(3) for both; q3 the ideal
  # order for A, and (1 + 2/log2(3)) / (2 + 1/log2(3)) for B.
  expected_a = {"q1": 1.0, "q2": 1 / math.log2(3), "q3": 1.0}
  expected_b = {"q1": 1 / math.log2(3), "q2": 1 / math.log2(3), "q3": (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))}
  # The same values as pytrec_eval computes directly from the runs.
  for run, expected in ((RUN_A, expected_a), (RUN_B, expected_b)):
    scored = pytrec_eval.RelevanceEvaluator(QRELS, {"ndcg_cut.10"}).evaluate(run)
    assert {q: scored[q]["ndcg_cut_10"] for q in QRELS} == pytest.approx(expected, rel=1e-12)
  assert result == compare(expected_a, expected_b, measure="ndcg@10", names=("new", "old"))
  assert (result.wins, result.ties, result.losses) == (2, 1, 0)
  printed = capsys.readouterr().out
  assert "new vs old on 3 queries: wins 2, ties 1, losses 0" in printed
  assert "paired randomization test: p = 0.5000 (exact, all 8 sign flips)" in printed
  written = json.loads(out.read_text())
  assert written["wins"] == 2 and written["randomization_pvalue"] == 0.5 and written["names"] == ["new", "old"]
  assert written["t_pvalue"] == pytest.approx(result.t_pvalue) and written["notes"] == []
  # A BEIR qrels TSV gives the same; another measure by its trec_eval name.
  assert main([str(run_a), str(run_b), f"--qrels={beir_qrels}", "--names=new,old"]) == result
  recip = main([str(run_a), str(run_b), f"--qrels={beir_qrels}", "--measure=recip_rank"])
  assert (recip.mean_a, recip.mean_b) == pytest.approx((5 / 6, 2 / 3)) and recip.names == ("a", "b")


def test_cli_leaves_out_unjudged_and_unretrieved_queries_with_a_note(files, tmp_path, capsys):
  run_a, run_b, trec_qrels, _ = files
  extra = write_run(tmp_path / "extra.trec", {**RUN_A, "q7": {"d1": 1.0}})
  qrels = tmp_path / "more.txt"
  qrels.write_text(trec_qrels.read_text() + "q8 0 d9 1\n")
  result = main([str(extra), str(run_b), f"--qrels={qrels}"])
  assert result.queries == 3
  printed = capsys.readouterr().out
  assert "note: 1 queries of extra have no judgements and are left out" in printed
  assert "note: 1 judged queries are in neither run and are left out" in printed


def test_cli_averages_replicates_of_a_system_per_query(files, tmp_path, capsys):
  """`a1,a2` is one system over two replicates (e.g. training seeds): each query's value is their mean, from
  pytrec_eval on each run; replicates over other queries are refused naming both files."""
  run_a, run_b, trec_qrels, _ = files
  shuffled = write_run(tmp_path / "a2.trec", {"q1": {"d2": 1.0, "d1": 0.5}, "q2": RUN_B["q2"], "q3": RUN_B["q3"]})
  out = tmp_path / "cmp.json"
  result = main([f"{run_a},{shuffled}", str(run_b), f"--qrels={trec_qrels}", f"--json={out}"])
  evaluator = pytrec_eval.RelevanceEvaluator(QRELS, {"ndcg_cut.10"})
  per_run = [evaluator.evaluate(run) for run in (RUN_A, {"q1": {"d2": 1.0, "d1": 0.5}, **{q: RUN_B[q] for q in
                                                                                         ("q2", "q3")}})]
  mean_a = {q: (per_run[0][q]["ndcg_cut_10"] + per_run[1][q]["ndcg_cut_10"]) / 2 for q in QRELS}
  b = {q: v["ndcg_cut_10"] for q, v in evaluator.evaluate(RUN_B).items()}
  assert result == compare(mean_a, b, measure="ndcg@10", names=("mean of 2 (a, a2)", "b"))
  assert mean_a["q3"] != b["q3"] and mean_a["q3"] != per_run[0]["q3"]["ndcg_cut_10"]  # both replicates count
  assert "mean of 2 (a, a2) vs b on 3 queries" in capsys.readouterr().out
  assert json.loads(out.read_text())["runs"] == [[str(run_a), str(shuffled)], str(run_b)]
  fewer = write_run(tmp_path / "fewer.trec", {q: RUN_A[q] for q in ("q1", "q2")})
  with pytest.raises(ValueError, match=r"a.trec and .*fewer.trec cover different queries: 1 only in .*a.trec"):
    main([f"{run_a},{fewer}", str(run_b), f"--qrels={trec_qrels}"])
  with pytest.raises(ValueError, match=r"RUN_A=.*nope.trec: no such file"):
    main([f"{run_a},{tmp_path / 'nope.trec'}", str(run_b), f"--qrels={trec_qrels}"])


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "o1jax.eval.compare", *map(str, args)], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)


def test_cli_bad_input_is_one_line_naming_it(files, tmp_path):
  run_a, run_b, trec_qrels, _ = files
  fewer = write_run(tmp_path / "fewer.trec", {q: RUN_B[q] for q in ("q1", "q2")})
  proc = run_cli(run_a, fewer, f"--qrels={trec_qrels}")
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
  assert proc.stderr == "error: a and fewer cover different queries: 1 only in a ('q3')\n"
  proc = run_cli(run_a, tmp_path / "nope.trec", f"--qrels={trec_qrels}")
  assert proc.returncode == 1 and proc.stderr == f"error: RUN_B={tmp_path / 'nope.trec'}: no such file\n"
  bad = tmp_path / "bad.trec"
  bad.write_text("q1 Q0 d1 1 high t\n")
  proc = run_cli(run_a, bad, f"--qrels={trec_qrels}")
  assert proc.returncode == 1 and "bad.trec, line 1, field 'score'" in proc.stderr and "Traceback" not in proc.stderr
  cases = [([f"--qrels={tmp_path}"], f"--qrels={tmp_path}: not a file"),
           ([f"--qrels={trec_qrels}", "--measure=ndcg@ten"], "--measure: unknown measure 'ndcg@ten'"),
           ([f"--qrels={trec_qrels}", "--names=a"], "--names=a: expected two different non-empty names"),
           ([f"--qrels={trec_qrels}", "--confidence=95"], "--confidence=95.0: must be in (0, 1)"),
           ([f"--qrels={trec_qrels}", "--permutations=0"], "--permutations=0: must be >= 1"),
           ([f"--qrels={trec_qrels}", f"--json={tmp_path}"], f"--json={tmp_path}: cannot be written"),
           ([f"--qrels={run_a}"], f"{run_a}, line 1, field 'columns'")]
  for args, message in cases:
    with pytest.raises(ValueError) as raised:
      main([str(run_a), str(run_b), *args])
    assert message in str(raised.value)
  other = tmp_path / "other.txt"
  other.write_text("x1 0 d1 1\n")
  with pytest.raises(ValueError, match="no query of a or b is judged in .*other.txt: wrong --qrels"):
    main([str(run_a), str(run_b), f"--qrels={other}"])


def test_published_dl19_runs(shared_dir, capsys):
  """RepLLaMA and TAS-B on DL19: the means are the published nDCG@10 (in rank order, as published)."""
  directory = shared_dir / "data/msmarco-trec-dl-pools/trec-dl19"
  result = main([str(directory / "runs/REP_LLAMA.trec.gz"), str(directory / "runs/D_BERT_KD_TASB.trec.gz"),
                 f"--qrels={directory / 'qrels/test.tsv'}", "--order=rank"])
  assert result.queries == 43 and result.names == ("REP_LLAMA", "D_BERT_KD_TASB")
  assert (round(result.mean_a, 4), round(result.mean_b, 4)) == (0.7439, 0.7210)
  assert result.wins + result.ties + result.losses == 43
