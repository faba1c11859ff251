"""METHOD §2 templates at the token level, with hand-written expectations."""
import pytest

from o1jax.templates import Lengths, document_sequence, pad_right, query_prefix, query_sequence
from o1jax.tokenizer import SpecialIds

SP = SpecialIds(query=100, query_end=101, thought=102, emb=103, eos=2, bos=1, pad=0)
SP_NO_BOS = SpecialIds(query=100, query_end=101, thought=102, emb=103, eos=2, bos=None, pad=2)


def test_query_with_thought_supervises_thought_and_eos_only():
  ids, mask = query_sequence([10, 11], [20, 21, 22], SP, Lengths())
  assert ids == [1, 100, 10, 11, 101, 102, 20, 21, 22, 2, 103]
  assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]


def test_generated_eos_is_not_doubled_and_text_after_it_is_dropped():
  ids, mask = query_sequence([10], [20, 2, 55], SP_NO_BOS, Lengths())
  assert ids == [100, 10, 101, 102, 20, 2, 103]
  assert mask == [0, 0, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("thought", [None, [], [2]])
def test_dropped_thought(thought):
  ids, mask = query_sequence([10, 11], thought, SP, Lengths())
  assert ids == [1, 100, 10, 11, 101, 102, 103]
  assert mask == [0] * 7


def test_truncation_keeps_emb_and_fits_the_budget():
  lengths = Lengths(query=3, query_thought=10, doc=5)
  ids, mask = query_sequence(list(range(10, 20)), list(range(30, 40)), SP, lengths)
  # query cut to 3 tokens, whole sequence to 9 then <emb>: the thought's EOS is cut away with the tail.
  assert ids == [1, 100, 10, 11, 12, 101, 102, 30, 31, 103]
  assert mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
  assert query_prefix(list(range(10, 20)), SP, lengths) == [1, 100, 10, 11, 12, 101, 102]
  assert document_sequence(list(range(50, 60)), SP, 5) == [1, 50, 51, 52, 103]
  assert document_sequence([50], SP_NO_BOS, 5) == [50, 103]


def test_pad_right():
  ids, mask = pad_right([[5, 6], [7]], 3, 0)
  assert ids.tolist() == [[5, 6, 0], [7, 0, 0]] and mask.tolist() == [[1, 1, 0], [1, 0, 0]]
  with pytest.raises(ValueError, match="sequence 0 has 4 tokens"):
    pad_right([[1, 2, 3, 4]], 3, 0)
