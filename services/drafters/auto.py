"""Hypothesis reduction (SLiM-style, "Speculate less, validate more"): several drafters propose, their
trees are merged, and only the nodes with the best draft score are verified, within the step's budget.

A node's draft score is the product of draft probabilities along its path (its chance to be reached,
in the drafter's own estimate). Merged, a path proposed by several drafters keeps its best score. Every
drafter's scores fall along a path, so the merged ones do too, and taking the top scores (shallower
first on ties) always gives a parent-closed tree. The per-sequence budget comes from the engine
(`SpecConfig.budget_per_sequence`): it shrinks as the batch grows and reaches 0 at high load, when the
engine does not call the drafters at all.
"""

from __future__ import annotations

from dataclasses import replace

from specserve.drafters.base import DraftRequest, Drafter
from specserve.engine.draft_tree import ROOT, DraftTree, tree_from_path_scores


class MergedDrafter:
    name = "auto"

    def __init__(self, drafters: list[Drafter], min_score: float = 0.0) -> None:
        assert drafters, "hypothesis reduction needs at least one drafter"
        self.drafters = drafters
        self.needs_hidden = any(drafter.needs_hidden for drafter in drafters)
        self.min_score = min_score  # nodes scoring below it are never verified, even with budget left

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        # The merge keeps nodes by score, which would bias sampled drafts' q (engine/draft_tree.py): every
        # drafter guesses, and the merged nodes are point masses.
        requests = [replace(r, sampling=None) for r in requests]
        proposals = [drafter.propose(requests) for drafter in self.drafters]
        return [self._reduce([trees[i] for trees in proposals], r.budget) for i, r in enumerate(requests)]

    def release(self, seq_id: int) -> None:
        for drafter in self.drafters:
            drafter.release(seq_id)

    def _reduce(self, trees: list[DraftTree], budget: int) -> DraftTree:
        scores: dict[tuple[int, ...], float] = {}  # token path -> best draft score
        for tree in trees:
            paths: list[tuple[int, ...]] = []
            for token, parent, score in zip(tree.tokens, tree.parents, tree.path_scores()):
                paths.append((paths[parent] if parent != ROOT else ()) + (token,))
                scores[paths[-1]] = max(scores.get(paths[-1], 0.0), score)
        best_first = dict(sorted(scores.items(), key=lambda item: -item[1]))  # siblings come out best first
        return tree_from_path_scores(best_first, budget, min_score=self.min_score)
