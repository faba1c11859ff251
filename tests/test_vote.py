"""Soft and hard committee votes against hand-computed expectations."""
import math

import numpy as np
import pytest

from data_tools import vote

# Member A is certain of candidate 0; members B and C mildly prefer candidate 1.
# A: softmax([10, 0, 0]) = [e^10, 1, 1] / (e^10 + 2) = [0.9999092, 0.0000454, 0.0000454]
# B, C: softmax([0, 0.1, 0]) = [1, e^0.1, 1] / (2 + e^0.1) = [0.3220435, 0.3559130, 0.3220435]
SPLIT = np.array([[10.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.1, 0.0]])


def test_soft_vote_hand_computed():
  result = vote.soft_vote(SPLIT)
  np.testing.assert_allclose(result.totals, [0.9999092 + 2 * 0.3220435, 0.0000454 + 2 * 0.3559130,
                                             0.0000454 + 2 * 0.3220435], atol=2e-7)
  assert result.winner == 0


def test_hard_vote_majority_differs_from_soft():
  result = vote.hard_vote(SPLIT)
  np.testing.assert_array_equal(result.totals, [1, 2, 0])
  assert result.winner == 1


def test_weights():
  # Silencing A leaves B + C: 2 * [0.3220435, 0.3559130, 0.3220435].
  soft = vote.soft_vote(SPLIT, weights=[0.0, 1.0, 1.0])
  np.testing.assert_allclose(soft.totals, [0.644087, 0.711826, 0.644087], atol=1e-6)
  assert soft.winner == 1
  # A's vote worth 3 beats two votes of 1.
  hard = vote.hard_vote(SPLIT, weights=[3.0, 1.0, 1.0])
  np.testing.assert_array_equal(hard.totals, [3, 2, 0])
  assert hard.winner == 0


def test_soft_vote_is_per_member_shift_invariant_and_scale_free_across_members():
  # A BM25-scale member and a cosine*100 member with the same preference count equally after softmax.
  scores = np.array([[0.0, math.log(3.0)], [50.0, 50.0 + math.log(3.0)]])
  result = vote.soft_vote(scores)
  np.testing.assert_allclose(result.totals, [0.5, 1.5])
  assert result.winner == 1


def test_ties_go_to_the_first_candidate():
  assert vote.soft_vote(np.zeros((2, 3))).winner == 0
  # softmax([0, ln2, ln2]) = [0.2, 0.4, 0.4]: candidates 1 and 2 tie exactly.
  tie = vote.soft_vote([[0.0, math.log(2.0), math.log(2.0)]])
  np.testing.assert_allclose(tie.totals, [0.2, 0.4, 0.4])
  assert tie.winner == 1
  # A member's own tie goes to its first top candidate (1, not 2); then 1 vote each for 0 and 1 -> 0.
  hard = vote.hard_vote([[1.0, 5.0, 5.0], [7.0, 0.0, 0.0]])
  np.testing.assert_array_equal(hard.totals, [1, 1, 0])
  assert hard.winner == 0


def test_dispatch_and_bad_input():
  assert vote.vote("hard", SPLIT).winner == 1
  assert vote.vote("soft", SPLIT).winner == 0
  with pytest.raises(ValueError, match="unknown vote 'median'"):
    vote.vote("median", SPLIT)
  with pytest.raises(ValueError, match="members, candidates"):
    vote.soft_vote([1.0, 2.0])
  with pytest.raises(ValueError, match="finite"):
    vote.hard_vote([[1.0, float("nan")]])
  with pytest.raises(ValueError, match="expected 3 member weights"):
    vote.soft_vote(SPLIT, weights=[1.0, 1.0])
