"""Retrieval drafter: the tree of what followed the longest matching suffix, its budget and draft probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from specserve.drafters.base import DraftRequest
from specserve.drafters.datastore import TokenDatastore
from specserve.drafters.rest import RestDrafter
from specserve.engine.draft_tree import ROOT, DraftTree

# After "1 2" the corpus continues with "5 9", "5 7", "5 9" and "6".
DOCS = [[1, 2, 5, 9], [1, 2, 5, 7], [1, 2, 5, 9], [1, 2, 6]]


def paths(tree: DraftTree) -> list[tuple[int, ...]]:
    return [tuple(tree.tokens[i] for i in tree.path_to(node)) for node in range(tree.num_nodes)]


def draft(docs: list[list[int]], token_ids: list[int], budget: int, **kwargs) -> DraftTree:
    drafter = RestDrafter(TokenDatastore.from_documents(docs, fingerprint="v"), **kwargs)
    return drafter.propose([DraftRequest(seq_id=0, token_ids=token_ids, num_prompt_tokens=1, budget=budget)])[0]


def test_most_frequent_nodes():
    tree = draft(DOCS, [0, 1, 2], budget=4)  # "0 1 2" never occurs; "1 2" does, four times
    assert tree.tokens == [5, 6, 7, 9]  # depth 1, then depth 2 in suffix order ("5 7" sorts before "5 9")
    assert tree.parents == [ROOT, ROOT, 0, 0]
    assert tree.draft_probs == pytest.approx([3 / 4, 1 / 4, 1 / 3, 2 / 3])  # count / parent count, root = 4


@pytest.mark.parametrize("budget,tokens", [(1, [5]), (2, [5, 9]), (3, [5, 6, 9]), (100, [5, 6, 7, 9])])
def test_budget_keeps_the_most_frequent(budget, tokens):
    assert draft(DOCS, [1, 2], budget).tokens == tokens  # counts: 5 -> 3, 5 9 -> 2, 6 -> 1, 5 7 -> 1


def test_longest_suffix_wins():
    tree = draft([[3, 1, 2, 8], *DOCS], [3, 1, 2], budget=4)
    assert tree.tokens == [8] and tree.draft_probs == [1.0]  # "3 1 2" occurs once: the "1 2" matches are ignored


def test_max_depth():
    tree = draft([[1, 2, 3, 4, 5, 6]], [1, 2], budget=10, max_depth=3)
    assert tree.tokens == [3, 4, 5] and tree.depths() == [1, 2, 3] and tree.draft_probs == [1.0, 1.0, 1.0]


def test_continuation_stops_at_document_end():
    tree = draft([[1, 2, 3], [1, 2, 3, 4]], [1, 2, 3], budget=4)
    assert tree.tokens == [4] and tree.draft_probs == [0.5]  # one of the two occurrences ends its document


@pytest.mark.parametrize("token_ids", [[7, 8, 9], [1], []], ids=["no-match", "too-short", "empty"])
def test_empty_tree(token_ids):
    assert draft(DOCS, token_ids, budget=8).num_nodes == 0


@pytest.mark.parametrize("seed", range(5))
def test_every_budget_is_parent_closed_and_most_frequent(seed):
    rng = np.random.default_rng(seed)
    docs = [[1, 2, *rng.integers(3, 6, size=4).tolist()] for _ in range(40)]
    full = draft(docs, [1, 2], budget=10_000, max_depth=4)
    counts = {path: round(score * 40) for path, score in zip(paths(full), full.path_scores())}
    for budget in range(1, full.num_nodes + 1):
        tree = draft(docs, [1, 2], budget, max_depth=4)  # DraftTree itself checks that parents come first
        kept = paths(tree)
        assert len(kept) == budget
        assert min(counts[p] for p in kept) >= max((counts[p] for p in set(counts) - set(kept)), default=0)
        for parent in [ROOT, *range(tree.num_nodes)]:  # children's probabilities never sum past 1
            assert sum(q for q, p in zip(tree.draft_probs, tree.parents) if p == parent) <= 1.0 + 1e-9


def test_batch_keeps_order_and_release_is_noop():
    drafter = RestDrafter(TokenDatastore.from_documents(DOCS, fingerprint="v"))
    trees = drafter.propose([
        DraftRequest(seq_id=1, token_ids=[7, 8], num_prompt_tokens=2, budget=2),
        DraftRequest(seq_id=2, token_ids=[1, 2], num_prompt_tokens=2, budget=2),
    ])
    drafter.release(1)
    drafter.release(99)
    assert drafter.name == "rest" and [t.tokens for t in trees] == [[], [5, 9]]
