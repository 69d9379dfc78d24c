"""Sampled drafts (drafters/sampling.py): children are drawn from q, the request's filtered distribution
cut to its SUPPORT likeliest tokens, without replacement; q comes back with them; a seed fixes the draws."""

from __future__ import annotations

import math

import pytest
import torch

from specserve.drafters import sampling
from specserve.drafters.sampling import SUPPORT, draft_generator, sample_children, samples
from specserve.engine.config import SamplingParams
from specserve.engine.sampler import probs_from_logits

LOGITS = torch.linspace(3.0, -3.0, 200)  # token i is likelier than token i + 1
T1 = SamplingParams(temperature=1.0)


def test_q_is_the_filtered_distribution_cut_to_its_support():
    params = SamplingParams(temperature=0.7, top_p=0.9)
    _, _, (ids, probs) = sample_children(LOGITS, params, 1, torch.Generator().manual_seed(0))
    full = probs_from_logits(LOGITS[None], [params])[0]
    head = full.topk(SUPPORT).values
    head = head[head > 0]
    assert ids == list(range(len(head)))  # the likeliest tokens, in order
    assert probs == pytest.approx((head / head.sum()).tolist(), rel=1e-5)
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-5)


def test_children_are_distinct_and_carry_their_q():
    tokens, probs, (ids, q) = sample_children(LOGITS, T1, 5, torch.Generator().manual_seed(1))
    assert len(tokens) == 5 and len(set(tokens)) == 5
    assert probs == [q[ids.index(t)] for t in tokens]


def test_the_token_map_names_target_tokens():
    token_map = torch.arange(200) * 3 + 1  # draft row i is target token 3i + 1
    tokens, _, (ids, _) = sample_children(LOGITS, T1, 2, torch.Generator().manual_seed(2), token_map)
    assert all((t - 1) % 3 == 0 for t in tokens + ids) and set(tokens) <= set(ids)


def test_fewer_children_than_asked_when_q_has_fewer_tokens():
    tokens, _, (ids, _) = sample_children(LOGITS, SamplingParams(temperature=1.0, top_k=3), 8, None)
    assert sorted(tokens) == [0, 1, 2] and ids == [0, 1, 2]


def test_first_child_follows_q():
    """Chi-square goodness of fit of 4000 draws over q's 64 tokens (p-value well above 1e-3)."""
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(200)
    for _ in range(4000):
        (token,), _, (ids, q) = sample_children(LOGITS, T1, 1, g)
        counts[token] += 1
    expected = torch.zeros(200)
    expected[ids] = torch.tensor(q) * 4000
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    statistic = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    assert statistic < dof + 4.5 * math.sqrt(2 * dof)  # ~p 1e-4 in the normal approximation


def test_a_seeded_requests_draws_depend_only_on_its_history_length():
    params = SamplingParams(temperature=1.0, seed=7)
    draw = lambda n: sample_children(LOGITS, params, 3, draft_generator(params, n))[0]  # noqa: E731
    assert draw(10) == draw(10)
    assert any(draw(10) != draw(n) for n in range(11, 16))
    assert draft_generator(SamplingParams(temperature=1.0), 10) is None  # unseeded: torch's global RNG


def test_only_sampling_requests_get_sampled_drafts():
    assert samples(T1) and not samples(SamplingParams()) and not samples(None)
    with pytest.raises(AssertionError):
        sample_children(LOGITS, SamplingParams(), 1, None)
    assert sampling.SUPPORT >= 1


def test_a_guessing_drafter_hides_the_sampling_settings():
    from specserve.drafters.base import DraftRequest
    from specserve.drafters.sampling import GuessingDrafter
    from specserve.engine.draft_tree import DraftTree

    class Recorder:
        name, needs_hidden = "rec", True

        def __init__(self) -> None:
            self.seen, self.released = [], []

        def propose(self, requests):
            self.seen += [r.sampling for r in requests]
            return [DraftTree() for _ in requests]

        def release(self, seq_id):
            self.released.append(seq_id)

    inner = Recorder()
    drafter = GuessingDrafter(inner)
    drafter.propose([DraftRequest(3, [1, 2], 1, 4, sampling=T1)])
    drafter.release(3)
    assert inner.seen == [None] and inner.released == [3]
    assert drafter.name == "rec:guess" and drafter.needs_hidden
