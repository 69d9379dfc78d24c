"""The one interface every draft source implements: a batch of sequences in, one token tree each out.

A drafter may keep per-sequence state (an n-gram index, a retrieval cursor) keyed by `seq_id`; that
state must be rebuildable from `token_ids` alone (the router holds the token history, a drafter
replica can be lost) and is dropped in `release`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specserve.engine.config import SamplingParams
from specserve.engine.draft_tree import DraftTree


@dataclass
class DraftRequest:
    """One sequence's share of a `propose` call."""

    seq_id: int
    token_ids: list[int]  # [num_tokens] the whole history: prompt + output so far (last = the root)
    num_prompt_tokens: int
    budget: int  # most nodes this sequence's tree may have (>= 1)
    # The target's final-norm hidden state of every token but the root, row i for token i
    # `# [num_tokens - 1, hidden]`; only for drafters with `needs_hidden` (feature drafters), else None.
    hidden_states: torch.Tensor | None = None
    # The request's sampling settings. Drafters with a distribution of their own (the learned ones) draw
    # sampled drafts from it when these are not greedy (drafters/sampling.py); None or greedy: the
    # drafter's deterministic guesses. Guessing drafters (n-gram, retrieval) ignore it.
    sampling: SamplingParams | None = None


class Drafter(Protocol):
    name: str
    # True: the engine keeps the target's hidden state of every computed token and sends it along
    # (`DraftRequest.hidden_states`); that costs a final norm over every row of every forward.
    needs_hidden: bool

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """One tree per request, in order, each with at most `request.budget` nodes (may be empty)."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget `seq_id`'s state (the sequence finished or was aborted). Unknown ids are ignored."""
        ...


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix: [1, 2, 3] and [1, 2, 5, 6] -> 2. Drafters with per-sequence
    state keep what the new history still shares with the one they last saw."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
