"""n-gram drafter: longest matching suffix wins, several matches become a tree, state follows the history."""

from __future__ import annotations

import pytest

from specserve.drafters.base import DraftRequest
from specserve.drafters.ngram import NgramConfig, NgramDrafter
from specserve.engine.draft_tree import ROOT
from specserve.errors import InvalidRequestError


def propose(drafter: NgramDrafter, tokens: list[int], budget: int = 8, seq_id: int = 0):
    return drafter.propose([DraftRequest(seq_id, tokens, num_prompt_tokens=len(tokens), budget=budget)])[0]


def test_repeated_phrase_is_proposed_as_a_chain():
    # "1 2 3 4 5 ... 1 2" -> after "1 2" came "3 4 5".
    tree = propose(NgramDrafter(NgramConfig(max_depth=3)), [1, 2, 3, 4, 5, 9, 1, 2])
    assert tree.tokens == [3, 4, 5]
    assert tree.parents == [ROOT, 0, 1]


def test_no_match_gives_an_empty_tree():
    assert propose(NgramDrafter(), [1, 2, 3, 4]).num_nodes == 0


def test_longest_suffix_wins_over_shorter_matches():
    # Suffix "7 2": after "7 2" came 8; after "2" alone, also 3 (earlier) — the 2-gram decides.
    tree = propose(NgramDrafter(NgramConfig(min_n=1, max_n=2, max_depth=1)), [2, 3, 7, 2, 8, 5, 7, 2])
    assert tree.tokens == [8]


def test_several_matches_become_branches():
    # After token 1 came 2 and (twice) 3: one tree with both, the better supported first.
    tree = propose(NgramDrafter(NgramConfig(max_n=1, max_depth=1)), [1, 3, 1, 2, 1, 3, 1])
    assert tree.tokens == [3, 2]
    assert tree.parents == [ROOT, ROOT]
    assert tree.draft_probs == pytest.approx([2 / 3, 1 / 3])


def test_budget_caps_the_tree():
    tree = propose(NgramDrafter(NgramConfig(max_depth=8)), [1, 2, 3, 4, 5, 6, 7, 1], budget=2)
    assert tree.tokens == [2, 3]


def test_incremental_state_matches_a_fresh_drafter():
    history = [5, 6, 7, 5, 6, 8, 5, 6, 7, 9, 5, 6]
    incremental, fresh = NgramDrafter(), NgramDrafter()
    for end in range(2, len(history) + 1):
        tree = propose(incremental, history[:end])
        assert tree == propose(fresh, history[:end], seq_id=end)


def test_diverging_history_rebuilds_the_index():
    drafter = NgramDrafter(NgramConfig(max_depth=1))
    assert propose(drafter, [1, 2, 1]).tokens == [2]
    # Same sequence id, different history (a preempted-and-rebuilt replica): no stale proposals.
    assert propose(drafter, [1, 4, 1]).tokens == [4]


def test_a_history_cut_back_equals_a_fresh_index():
    """A draft asked ahead on a guessed history, then the real one: the index is cut back to the common
    prefix, not rebuilt, and must hold exactly what a fresh index of the real history holds."""
    real = [5, 6, 7, 5, 6, 8, 5, 6, 7, 9, 5, 6, 3, 5]
    drafter = NgramDrafter()
    propose(drafter, real[:10])
    propose(drafter, real[:10] + [5, 6, 7, 5, 6])  # the guess: a path of 4 accepted, then 6
    assert propose(drafter, real) == propose(NgramDrafter(), real)
    assert drafter.histories[0].followers == NgramDrafter()._sync(1, real).followers


def test_release_forgets_the_sequence():
    drafter = NgramDrafter()
    propose(drafter, [1, 2, 1], seq_id=3)
    drafter.release(3)
    drafter.release(99)  # unknown ids are ignored
    assert 3 not in drafter.histories


@pytest.mark.parametrize("kwargs", [{"min_n": 0}, {"min_n": 3, "max_n": 2}, {"max_depth": 0}, {"max_matches": 0}])
def test_bad_config_is_a_clear_error(kwargs):
    with pytest.raises(InvalidRequestError):
        NgramConfig(**kwargs)
