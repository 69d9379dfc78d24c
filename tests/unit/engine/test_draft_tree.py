"""DraftTree: parent-index encoding, depths, paths, masks, pruning, and building a tree from continuations."""

from __future__ import annotations

import pytest

from specserve.engine.draft_tree import ROOT, DraftTree, tree_from_continuations

# root ─ 5 ─ 9
#      └ 7
FORK = DraftTree(tokens=[5, 9, 7], parents=[ROOT, 0, ROOT], draft_probs=[0.6, 0.5, 0.3])


def test_chain_is_a_single_branch():
    chain = DraftTree.chain([4, 8, 15])
    assert chain.parents == [ROOT, 0, 1]
    assert chain.depths() == [1, 2, 3]
    assert chain.draft_probs == [1.0, 1.0, 1.0]


def test_empty_tree():
    tree = DraftTree()
    assert tree.num_nodes == 0 and tree.depths() == [] and tree.ancestor_mask() == []
    assert tree.children() == {ROOT: []}


def test_depths_paths_children_and_scores():
    assert FORK.depths() == [1, 2, 1]
    assert FORK.path_to(1) == [0, 1]
    assert FORK.path_to(2) == [2]
    assert FORK.children() == {ROOT: [0, 2], 0: [1], 1: [], 2: []}
    assert FORK.path_scores() == pytest.approx([0.6, 0.3, 0.3])


def test_ancestor_mask_sees_self_and_ancestors_only():
    assert FORK.ancestor_mask() == [
        [True, False, False],
        [True, True, False],
        [False, False, True],
    ]


def test_subtree_keeps_parent_closed_nodes_and_reindexes():
    pruned = FORK.subtree([0, 2])
    assert pruned.tokens == [5, 7] and pruned.parents == [ROOT, ROOT]
    with pytest.raises(AssertionError):
        FORK.subtree([1])  # node 1 without its parent


def test_first_path_and_the_part_after_a_guessed_token():
    # root ─ 5 ─ 9 ─ 4
    #      │   └ 8
    #      └ 7
    tree = DraftTree(tokens=[5, 9, 7, 4, 8], parents=[ROOT, 0, ROOT, 1, 0], draft_probs=[0.6, 0.5, 0.3, 0.9, 0.2])
    assert tree.first_path() == [5, 9, 4]
    assert tree.after(5) == DraftTree(tokens=[9, 4, 8], parents=[ROOT, 0, ROOT], draft_probs=[0.5, 0.9, 0.2])
    assert tree.after(7) == DraftTree()  # guessed, but nothing drafted below it
    assert tree.after(9) is None  # 9 is not a depth-1 node
    assert DraftTree().first_path() == [] and DraftTree().after(5) is None


@pytest.mark.parametrize("tokens,parents,probs", [
    ([1, 2], [ROOT, 5], [1.0, 1.0]),  # parent after the node
    ([1, 1], [ROOT, ROOT], [1.0, 1.0]),  # duplicate siblings
    ([1], [ROOT], [0.0]),  # zero draft probability
    ([1], [ROOT, ROOT], [1.0]),  # lengths differ
])
def test_invalid_trees_are_rejected(tokens, parents, probs):
    with pytest.raises(AssertionError):
        DraftTree(tokens, parents, probs)


def test_tree_from_continuations_counts_support():
    tree = tree_from_continuations([[4, 5], [4, 6], [7]], budget=3)
    assert tree.tokens == [4, 7, 5]
    assert tree.parents == [ROOT, ROOT, 0]
    assert tree.draft_probs == pytest.approx([2 / 3, 1 / 3, 1 / 2])


@pytest.mark.parametrize("budget", [0, 1, 2, 5, 100])
def test_tree_from_continuations_respects_budget_and_stays_parent_closed(budget: int):
    continuations = [[1, 2, 3, 4], [1, 2, 5], [1, 6], [7, 8, 9], [1, 2, 3, 10]]
    tree = tree_from_continuations(continuations, budget)
    assert tree.num_nodes == min(budget, 10)  # distinct prefixes: 1 2 3 4, 2 5, 1 6, 7 8 9, 3 10
    assert all(p < i for i, p in enumerate(tree.parents))  # topological: DraftTree also asserts it
    if budget >= 1:
        assert tree.tokens[0] == 1  # the most supported first token


def test_tree_from_continuations_of_nothing_is_empty():
    assert tree_from_continuations([], budget=8).num_nodes == 0


# root ─ 5 ─ 9      row 0 (the root) sampled 5 then 7 from its q; row 1 (node 0) sampled 9
#      └ 7
SAMPLED = DraftTree(tokens=[5, 9, 7], parents=[ROOT, 0, ROOT], draft_probs=[0.5, 0.6, 0.25],
                    draft_dists={0: ([5, 7, 8], [0.5, 0.25, 0.25]), 1: ([9, 4], [0.6, 0.4])})


@pytest.mark.parametrize("dists,match", [
    ({4: ([5], [1.0])}, "no such row"),  # rows 0 (the root) to 3 (node 2)
    ({0: ([5, 7], [0.5, 0.6])}, "not a distribution"),
    ({0: ([5, 5], [0.5, 0.5])}, "one probability per token id"),
    ({0: ([5, 8], [0.5, 0.5])}, "a child outside its draft distribution"),  # child 7 has q = 0
    ({0: ([5, 7], [1.0, 0.0])}, "a child outside its draft distribution"),
])
def test_draft_distributions_must_cover_their_rows_children(dists, match):
    with pytest.raises(AssertionError, match=match):
        DraftTree(tokens=[5, 9, 7], parents=[ROOT, 0, ROOT], draft_probs=[0.5, 0.6, 0.25], draft_dists=dists)


def test_subtree_keeps_a_rows_distribution_only_with_all_its_children():
    assert SAMPLED.subtree([0, 1, 2]).draft_dists == SAMPLED.draft_dists
    # Dropping node 2 thins the root's sampled children: the root row falls back to point masses.
    assert SAMPLED.subtree([0, 1]).draft_dists == {1: ([9, 4], [0.6, 0.4])}
    # Dropping node 1 empties row 1; the root keeps both its children and its q.
    assert SAMPLED.subtree([0, 2]).draft_dists == {0: ([5, 7, 8], [0.5, 0.25, 0.25])}


def test_the_part_after_a_token_renumbers_the_rows_below_it():
    below = SAMPLED.after(5)
    assert below.tokens == [9] and below.draft_dists == {0: ([9, 4], [0.6, 0.4])}  # node 0's row is the new root
    assert DraftTree.chain([4, 2], [0.5, 1.0], {1: ([2], [1.0])}).after(4).draft_dists == {0: ([2], [1.0])}
