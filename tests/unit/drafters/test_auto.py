"""Hypothesis reduction: trees of several drafters merge, the best-scored nodes fill the budget."""

from __future__ import annotations

import pytest

from specserve.drafters.auto import MergedDrafter
from specserve.drafters.base import DraftRequest
from specserve.engine.draft_tree import ROOT, DraftTree


class FixedDrafter:
    """Proposes the same tree for every request; remembers releases."""

    name = "fixed"
    needs_hidden = False

    def __init__(self, tree: DraftTree) -> None:
        self.tree, self.released = tree, []

    def propose(self, requests):
        return [self.tree for _ in requests]

    def release(self, seq_id):
        self.released.append(seq_id)


def request(budget: int) -> DraftRequest:
    return DraftRequest(seq_id=7, token_ids=[1, 2, 3], num_prompt_tokens=3, budget=budget)


# A: root ─ 4 (0.9) ─ 5 (0.5)          scores 0.9, 0.45
# B: root ─ 4 (0.6) ─ 6 (1.0), root ─ 8 (0.3)   scores 0.6, 0.6, 0.3
A = DraftTree([4, 5], [ROOT, 0], [0.9, 0.5])
B = DraftTree([4, 6, 8], [ROOT, 0, ROOT], [0.6, 1.0, 0.3])


def test_shared_paths_merge_and_keep_their_best_score():
    (tree,) = MergedDrafter([FixedDrafter(A), FixedDrafter(B)]).propose([request(budget=8)])
    assert tree.tokens == [4, 8, 6, 5]
    assert tree.parents == [ROOT, ROOT, 0, 0]
    assert tree.path_scores() == pytest.approx([0.9, 0.3, 0.6, 0.45])


@pytest.mark.parametrize("budget,tokens", [(1, [4]), (2, [4, 6]), (3, [4, 6, 5]), (0, [])])
def test_budget_keeps_the_best_scored_nodes(budget, tokens):
    (tree,) = MergedDrafter([FixedDrafter(A), FixedDrafter(B)]).propose([request(budget)])
    assert sorted(tree.tokens) == sorted(tokens)


def test_min_score_drops_unlikely_nodes():
    (tree,) = MergedDrafter([FixedDrafter(A), FixedDrafter(B)], min_score=0.5).propose([request(budget=8)])
    assert sorted(tree.tokens) == [4, 6]


def test_release_reaches_every_drafter():
    a, b = FixedDrafter(A), FixedDrafter(B)
    MergedDrafter([a, b]).release(7)
    assert a.released == b.released == [7]
