"""Prompt/output n-gram lookup with several n at once (ANPD-style, Ou et al. 2024, multi-level n-grams).

The sequence's own history is the datastore: find earlier places where its last n tokens occurred and
propose what followed them. The longest n that matches wins (a longer context is a more specific
prediction); when none of the levels match, the tree is empty. Several matches become one tree: the
trie of their continuations, pruned to the budget by how many matches support each node.

Per-sequence state is an incremental index (n-gram -> positions right after it), extended with the
tokens appended since the last call; it is rebuilt from `token_ids` when the history does not extend
what the index has seen (a new sequence, a preemption, a replica that lost its state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve.drafters.base import DraftRequest, common_prefix_len
from specserve.engine.draft_tree import DraftTree, tree_from_continuations
from specserve.errors import InvalidRequestError


@dataclass(frozen=True)
class NgramConfig:
    min_n: int = 1  # shortest suffix that may match; 1 proposes after any repeated token
    max_n: int = 4  # longest suffix tried first
    max_depth: int = 8  # tokens per continuation
    max_matches: int = 8  # most recent occurrences that vote for the tree

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise InvalidRequestError(f"n-gram sizes need 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")
        if self.max_depth < 1 or self.max_matches < 1:
            raise InvalidRequestError("n-gram max_depth and max_matches must be >= 1")


@dataclass
class _History:
    """One sequence's tokens and, per n, where each n-gram was followed by another token."""

    tokens: list[int] = field(default_factory=list)
    # n -> n-gram -> positions p (ascending) with tokens[p - n : p] == n-gram; tokens[p] is what followed.
    followers: dict[int, dict[tuple[int, ...], list[int]]] = field(default_factory=dict)


class NgramDrafter:
    name = "ngram"
    needs_hidden = False

    def __init__(self, config: NgramConfig = NgramConfig()) -> None:
        self.config = config
        self.histories: dict[int, _History] = {}

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        return [self._propose_one(r) for r in requests]

    def release(self, seq_id: int) -> None:
        self.histories.pop(seq_id, None)

    def _propose_one(self, request: DraftRequest) -> DraftTree:
        history = self._sync(request.seq_id, request.token_ids)
        tokens, config = history.tokens, self.config
        for n in range(min(config.max_n, len(tokens) - 1), config.min_n - 1, -1):
            positions = history.followers[n].get(tuple(tokens[-n:]))
            if positions:
                recent = positions[-config.max_matches:][::-1]  # most recent first: ties go to them
                continuations = [tokens[p : p + config.max_depth] for p in recent]
                return tree_from_continuations(continuations, request.budget)
        return DraftTree()

    def _sync(self, seq_id: int, token_ids: list[int]) -> _History:
        """The sequence's index, extended with the tokens it has not seen; where `token_ids` part from
        what it has seen (a draft asked for ahead on a guessed history, a preemption), cut back to the
        common prefix first."""
        history = self.histories.get(seq_id)
        if history is None:
            history = _History(followers={n: {} for n in range(self.config.min_n, self.config.max_n + 1)})
            self.histories[seq_id] = history
        seen = len(history.tokens)
        if token_ids[:seen] != history.tokens:
            seen = common_prefix_len(history.tokens, token_ids)
            _truncate(history, seen)
        history.tokens.extend(token_ids[seen:])
        tokens = history.tokens
        # An n-gram ending at p - 1 gains a follower once tokens[p] exists, i.e. for p < len(tokens).
        for p in range(max(seen, 1), len(tokens)):
            for n, table in history.followers.items():
                if p >= n:
                    table.setdefault(tuple(tokens[p - n : p]), []).append(p)
        return history


def _truncate(history: _History, keep: int) -> None:
    """Forget tokens from `keep` on: each later position p was appended last to its n-gram's list."""
    tokens = history.tokens
    for p in range(len(tokens) - 1, max(keep, 1) - 1, -1):
        for n, table in history.followers.items():
            if p >= n:
                key = tuple(tokens[p - n : p])
                table[key].pop()
                if not table[key]:
                    del table[key]
    del tokens[keep:]
