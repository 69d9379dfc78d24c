"""Retrieval drafter (He et al. 2023, "REST: Retrieval-Based Speculative Decoding").

The longest suffix of a sequence is looked up in a token datastore; the tokens that followed its
occurrences form a trie, and its most frequent nodes are drafted (`tree_from_continuations`). No
model and no per-sequence state.
"""

from __future__ import annotations

from specserve.drafters.base import DraftRequest
from specserve.drafters.datastore import TokenDatastore
from specserve.engine.draft_tree import DraftTree, tree_from_continuations


class RestDrafter:
    name = "rest"
    needs_hidden = False

    def __init__(self, datastore: TokenDatastore, *, max_depth: int = 8, max_matches: int = 256,
                 min_suffix_len: int = 2, max_suffix_len: int = 16) -> None:
        """`max_depth`: longest drafted path; `max_matches`: occurrences read per lookup;
        suffixes of `min_suffix_len`..`max_suffix_len` tokens are looked up, the longest that occurs wins."""
        assert max_depth >= 1 and max_matches >= 1 and 1 <= min_suffix_len <= max_suffix_len
        self.datastore = datastore
        self.max_depth = max_depth
        self.max_matches = max_matches
        self.min_suffix_len = min_suffix_len
        self.max_suffix_len = max_suffix_len

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        return [self._draft(request) for request in requests]

    def release(self, seq_id: int) -> None:
        """Nothing to forget: every draft is computed from `token_ids` alone."""

    def _draft(self, request: DraftRequest) -> DraftTree:
        assert request.budget >= 1, "a draft budget is at least one node"
        match = self.datastore.lookup(request.token_ids, self.min_suffix_len, self.max_suffix_len, self.max_matches)
        if match.length == 0:
            return DraftTree()
        # One continuation per match, empty ones included: the root's count is the number of matches.
        return tree_from_continuations(self.datastore.continuations(match.starts, self.max_depth), request.budget)
