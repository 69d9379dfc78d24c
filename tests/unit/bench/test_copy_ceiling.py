"""The copy-drafting ceilings of bench/bench_copy_ceiling.py on hand-made token sequences."""

import random

from specserve.bench.copy_ceiling import (
    accepted_path,
    any_copy,
    best_suffix_match,
    match_len,
    most_recent_match,
    replay,
    tree_drafter,
)
from specserve.drafters.ngram import NgramDrafter
from specserve.engine.draft_tree import ROOT, DraftTree


def test_match_len_stops_at_the_first_difference_or_the_cap():
    assert match_len([1, 2, 3], [1, 2, 4], 5) == 2
    assert match_len([1, 2, 3], [1, 2, 3], 2) == 2
    assert match_len([], [1], 5) == 0


def test_any_copy_is_the_longest_start_of_the_future_found_in_the_history():
    history = [1, 2, 3, 4]
    assert any_copy(history, [2, 3, 9], 5) == 2
    assert any_copy(history, [2, 3, 4, 5], 2) == 2  # capped by the budget
    assert any_copy(history, [9, 1], 5) == 0


def test_suffix_matches_follow_earlier_occurrences_of_the_last_tokens():
    # The last token, 5, occurred at 0 (followed by 1, 2, 7) and at 4 (followed by 1, 3, 4).
    history = [5, 1, 2, 7, 5, 1, 3, 4, 5]
    assert best_suffix_match()(history, [1, 2, 7, 0], 5) == 3
    assert most_recent_match()(history, [1, 2, 7, 0], 5) == 1  # the most recent one reads 1, 3
    assert most_recent_match()(history, [1, 3, 4, 0], 5) == 3
    assert best_suffix_match()(history, [6], 5) == 0
    # A longer matching suffix wins for the most recent match: (7, 5) occurred once, followed by 1, 2.
    assert most_recent_match()([7, 5, 1, 2, 5, 1, 3, 7, 5], [1, 2], 5) == 2


def test_replay_counts_steps_of_accepted_drafts_plus_the_targets_token():
    prompt, output = [1, 2, 3], [1, 2, 3, 1, 2, 3]
    # Step 1 copies 1, 2, 3 and the target adds 1; step 2 may accept 2 but must leave the target the last token.
    assert replay(prompt, output, any_copy, 5) == 2
    assert replay(prompt, output, any_copy, 1) == 3  # 2 tokens a step
    assert replay(prompt, output, lambda history, future, budget: 0, 5) == len(output)


def test_accepted_path_walks_the_tree_along_the_future():
    tree = DraftTree(tokens=[5, 9, 7], parents=[ROOT, 0, ROOT], draft_probs=[0.5, 1.0, 0.5])
    assert accepted_path(tree, [5, 9, 1]) == 2
    assert accepted_path(tree, [7, 1]) == 1
    assert accepted_path(tree, [9]) == 0
    assert accepted_path(DraftTree(), [5]) == 0


def test_the_ngram_drafter_never_beats_the_best_suffix_match():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(400)]  # a small vocabulary repeats often
    drafter = NgramDrafter()
    draft, bound = tree_drafter(drafter, 0, 10), best_suffix_match()
    accepted = []
    for i in range(10, 390):
        got = draft(tokens[:i], tokens[i:], 5)
        assert got <= bound(tokens[:i], tokens[i:], 5), i
        accepted.append(got)
    drafter.release(0)
    assert max(accepted) >= 2  # the replay does accept drafted tokens
