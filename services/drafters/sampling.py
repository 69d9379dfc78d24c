"""Sampled drafts: a learned drafter's tokens drawn from its own distribution at the request's settings.

At temperature > 0 an argmax draft x is accepted with probability p(x) alone (a point mass), which on this
model is ~0.1-0.3 at T=1: tau collapses to ~1.1. A token drawn from the drafter's own distribution q is
accepted with probability min(1, p(x) / q(x)), on average sum_x min(p(x), q(x)): the closer q is to p,
the closer to 1 (Leviathan et al. 2023; engine/acceptance.py). So at T > 0 the learned drafters draw
each row's children from

    q = the drafter's logits through the request's own filters (temperature, top-k, top-p, min-p, the
        sampler's `probs_from_logits`), then cut to its SUPPORT likeliest tokens and renormalized

and hand q to the verifier with the tree (`DraftTree.draft_dists`, sparse). Cutting the support keeps a
tree's q small (a few hundred numbers a row rather than a vocabulary) and loses little overlap: beyond
the filtered head the drafter's tail is rarely where the target's mass is. Several children of one row
are drawn one after another without replacement (torch.multinomial), the order the acceptance rule tries
them in.

Randomness: a seeded request's draws come from a generator seeded by (request seed, history length), so
its drafts are a function of its history and a seeded request stays reproducible even when a drafter
replica is lost and its state rebuilt; unseeded requests draw from torch's global generator.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from specserve.drafters.base import DraftRequest, Drafter
from specserve.engine.config import SamplingParams
from specserve.engine.draft_tree import DraftTree, SparseDist
from specserve.engine.sampler import probs_from_logits

# q keeps this many of the drafter's likeliest tokens (after the request's filters).
SUPPORT = 64

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) spreading (seed, length) pairs apart
_MASK = (1 << 63) - 1


def samples(params: SamplingParams | None) -> bool:
    """Whether a request with these settings gets sampled drafts (else deterministic guesses)."""
    return params is not None and not params.greedy


def draft_generator(params: SamplingParams, num_tokens: int) -> torch.Generator | None:
    """The generator of one drafting call for a sequence whose history has `num_tokens` tokens."""
    if params.seed is None:
        return None
    return torch.Generator().manual_seed((params.seed * _SEED_MIX + num_tokens) & _MASK)


def sample_children(
    logits: torch.Tensor,  # [vocab_rows] float32, one row of the drafter's logits
    params: SamplingParams,  # the request's (not greedy)
    num_children: int,  # >= 1; fewer come back when q has fewer tokens
    generator: torch.Generator | None,
    token_map: torch.Tensor | None = None,  # [vocab_rows] target id of each logit row; None = identity
) -> tuple[list[int], list[float], SparseDist]:
    """Draw children from q without replacement: their target token ids, their q, and q itself."""
    assert not params.greedy and num_children >= 1
    q = probs_from_logits(logits[None].float(), [params])[0]  # [vocab_rows]
    top = q.topk(min(SUPPORT, q.shape[0]))
    keep = top.values > 0
    values, rows = top.values[keep], top.indices[keep]
    values = values / values.sum()
    drawn = torch.multinomial(values, min(num_children, values.shape[0]), replacement=False, generator=generator)
    ids = rows if token_map is None else token_map[rows]
    return ids[drawn].tolist(), values[drawn].tolist(), (ids.tolist(), values.tolist())


class GuessingDrafter:
    """`inner` made to guess (argmax / top-k drafts, point masses) even for sampling requests: what the
    learned drafters did before they sampled, kept as the comparison point (`bench spec --drafters
    eagle:guess`)."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.name = f"{inner.name}:guess"
        self.needs_hidden = inner.needs_hidden

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        return self.inner.propose([replace(r, sampling=None) for r in requests])

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)
