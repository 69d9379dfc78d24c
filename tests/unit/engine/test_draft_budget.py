"""The cost-aware speculation budget (engine/draft_budget.py), pure logic: the cost fit, the acceptance
estimate, and which nodes pay for themselves."""

from __future__ import annotations

import pytest

from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.verify import SpecStats
from specserve.engine.draft_budget import (
    MARGIN,
    PRIOR_COST_RATIO,
    RecentAcceptance,
    StepCost,
    acceptance_by_depth,
    draft_budgets,
)


def test_step_cost_separates_sequences_from_rows() -> None:
    cost = StepCost(refit_every=4)
    assert cost.ratios(4, 4) == (PRIOR_COST_RATIO, 0.0)
    for i in range(64):
        seqs = 1 + i % 6
        rows = seqs * (1 + (i * 7) % 9)  # trees of 0-8 nodes
        cost.observe(seqs, rows, 0.030 + 0.004 * seqs + 0.001 * rows)
    assert cost.coef == pytest.approx((0.030, 0.004, 0.001))
    cost.observe_draft(0.005)
    row_ratio, draft_ratio = cost.ratios(4, 4)
    assert row_ratio == pytest.approx(0.001 / 0.050) and draft_ratio == pytest.approx(0.005 / 0.050)


def test_a_fit_from_heavy_load_does_not_price_small_forwards_out() -> None:
    """Forwards of 16-32 sequences only: the intercept extrapolates below zero at one sequence, which
    would make a row cost a whole step. The fastest forward seen bounds the step's time instead."""
    cost = StepCost(refit_every=4)
    for i in range(64):
        seqs = 16 + i % 17
        rows = seqs + (i * 5) % 32
        cost.observe(seqs, rows, -0.010 + 0.004 * seqs + 0.001 * rows)
    assert cost.coef[0] < 0
    row_ratio, _ = cost.ratios(1, 1)
    assert row_ratio == pytest.approx(0.001 / min(t for _, _, t in cost.samples))


def test_step_cost_waits_until_sequences_and_rows_vary_apart() -> None:
    cost = StepCost(refit_every=4)
    for i in range(32):
        n = 1 + i % 4
        cost.observe(n, n, 0.03 + 0.01 * n)  # plain decoding only: rows == sequences
    assert cost.coef is None and cost.ratios(2, 2) == (PRIOR_COST_RATIO, 0.0)
    # Deadlines (the router's hang detection) still get a time: the slowest forward seen.
    assert cost.bound(2, 2) == pytest.approx(0.07)


def test_step_cost_bound_follows_the_fit_and_is_none_before_any_forward() -> None:
    cost = StepCost(refit_every=4)
    assert cost.bound(1, 1) is None
    for i in range(32):
        rows = 1 + (i * 5) % 9
        cost.observe(1, rows, 0.028 + 0.0005 * rows)
    assert cost.bound(1, 3) == pytest.approx(cost.predict(1, 3)) == pytest.approx(0.0295)


def test_one_batch_size_still_prices_a_row() -> None:
    """Batch 1 all along: sequences never vary, so t_seq folds into t0 and the rows alone are fitted."""
    cost = StepCost(refit_every=4)
    for i in range(32):
        rows = 1 + (i * 5) % 9  # a decode, or a verify of 1-8 drafted tokens
        cost.observe(1, rows, 0.028 + 0.0005 * rows)
    t0, t_seq, t_row = cost.coef
    assert t_seq == 0.0 and t0 == pytest.approx(0.028) and t_row == pytest.approx(0.0005)
    assert cost.ratios(1, 1)[0] == pytest.approx(0.0005 / 0.0285)


def stats(accepted: list[int], reached: list[int]) -> SpecStats:
    """Counters of chains (one node per depth per tree)."""
    s = SpecStats()
    s.accepted_by_depth, s.reached_by_depth, s.nodes_by_depth = accepted, reached, list(reached)
    return s


def test_acceptance_shrinks_to_the_drafter_rate_and_never_rises_with_depth() -> None:
    drafter = stats([80, 40, 10], [100, 100, 100])  # ~0.8, 0.4, 0.1
    fresh = acceptance_by_depth(SpecStats(), drafter, 4)
    assert fresh[:3] == pytest.approx([81 / 102, 41 / 102, 11 / 102])
    assert fresh[3] == pytest.approx(11 / 102)  # no data at depth 4: 0.5 by Laplace, capped by depth 3
    lucky = acceptance_by_depth(stats([20, 20, 20], [20, 20, 20]), drafter, 3)
    assert lucky[2] > 0.8 > fresh[2]  # the request's own record outweighs the prior once it has some
    assert all(a >= b for a, b in zip(lucky, lucky[1:]))


def test_acceptance_is_per_node_when_a_drafter_branches() -> None:
    """A drafter that spends its budget on two sibling branches per depth: the accepted path still
    reaches depth 1 in 80 of 100 trees, but each of the 200 nodes drafted there is accepted 40% of the
    time, and each costs a row, so the estimate must be the per-node rate."""
    drafter = SpecStats()
    for i in range(100):
        tree = DraftTree(tokens=[1, 2, 3, 4], parents=[ROOT, ROOT, 0, 1], draft_probs=[1.0] * 4)
        drafter.record(tree, accepted=2 if i < 40 else (1 if i < 80 else 0), emitted=1)
    p = acceptance_by_depth(SpecStats(), drafter, 2)
    assert p == pytest.approx([81 / 202, 41 / 202])


def test_light_load_drafts_deep_and_heavy_load_drafts_nothing() -> None:
    p = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02]
    alone = draft_budgets({1: p}, base_tokens=1.0, row_ratio=0.05, max_nodes=64)
    # After five nodes, 1 + 2.0 expected tokens; the sixth (p 0.1) would need
    # p * (1 + 0.05 * 5) > MARGIN * 0.05 * 3.0, i.e. p > 0.15.
    assert MARGIN == 1.25 and alone == {1: 5}
    # 32 decoding sequences: a row costs 0.05 of a step that yields 32 tokens.
    crowd = draft_budgets({rid: p for rid in range(32)}, base_tokens=32.0, row_ratio=0.05, max_nodes=64)
    assert sum(crowd.values()) == 0  # 0.6 < MARGIN * 0.05 * 32: plain decoding pays more
    mid = draft_budgets({rid: p for rid in range(4)}, base_tokens=4.0, row_ratio=0.05, max_nodes=64)
    assert 0 < sum(mid.values()) < 4 * 5


def test_better_requests_get_the_nodes_and_the_cap_holds() -> None:
    good, poor = [0.9] * 8, [0.2] * 8
    budgets = draft_budgets({1: good, 2: poor}, base_tokens=2.0, row_ratio=0.05, max_nodes=64)
    assert budgets[1] == 8 and budgets[2] < 8
    capped = draft_budgets({1: good, 2: good}, base_tokens=2.0, row_ratio=0.01, max_nodes=5)
    assert sum(capped.values()) == 5
    assert draft_budgets({1: []}, 1.0, 0.05, 64) == {1: 0}  # no room left in the request


def test_a_draft_must_also_pay_for_its_drafting_round() -> None:
    p = [0.3, 0.1]
    free = draft_budgets({1: p, 2: p}, base_tokens=2.0, row_ratio=0.05, max_nodes=64)
    assert sum(free.values()) == 2
    # Drafting at 0.3 of a step: 2.6 tokens / (1 + 0.05 * 2 + 0.3) steps < 2 tokens per step without.
    costly = draft_budgets({1: p, 2: p}, base_tokens=2.0, row_ratio=0.05, max_nodes=64, draft_ratio=0.3)
    assert costly == {1: 0, 2: 0}


class _InfoOnly:
    """A replica stub that answers Info and nothing else: enough to build a Router whose budget is read."""

    def __init__(self, info) -> None:
        self._info = info

    def Info(self, request, timeout=None):  # noqa: N802 (the gRPC method's name)
        return self._info


def test_a_joining_prompt_does_not_make_drafts_look_free(tokenizer) -> None:
    """A request whose 500-token prompt is still to be sent shares the step with one decoding request.
    The prompt may be all prefix-cache hits (the router cannot know), so drafts are priced against the
    decode step alone: the decoding request's budget is what it is without the newcomer. (Priced against
    a 500-row step, a row looked like 1/500 of it and every node paid.)"""
    from specserve.engine.config import SamplingParams
    from specserve.router.backends import Replica
    from specserve.router.core import Router, RouterConfig
    from specserve.v1 import drafter_pb2, verifier_pb2

    verifier = Replica("v", _InfoOnly(verifier_pb2.VerifierInfo(model_fingerprint="m", vocab_size=49152,
                                                                max_total_tokens=2048)))
    drafter = Replica("d", _InfoOnly(drafter_pb2.DrafterInfo(model_fingerprint="m")))
    router = Router(tokenizer, [verifier], {"ngram": [drafter]}, RouterConfig())
    for i in range(64):  # t0 30 ms, 2 ms per sequence, 2 ms per row
        seqs = 1 + i % 4
        cost_rows = seqs + (i * 3) % 7
        router.step_cost.observe(seqs, cost_rows, 0.030 + 0.002 * seqs + 0.002 * cost_rows)
    decoding = router.submit(list(range(100, 140)), SamplingParams(max_tokens=64), mode="lossless")
    joining = router.submit(list(range(200, 700)), SamplingParams(max_tokens=64), mode="lossless")
    router._admit()
    first = router._by_rid[decoding.rid]
    first.verifier, first.v_tokens, first.v_computed = verifier, 40, 39
    first.recent.accepted_by_depth, first.recent.nodes_by_depth = [3, 2, 1, 0], [6, 6, 6, 6]  # p ~ 0.5, 0.4, ...
    assert first.decoding and not router._by_rid[joining.rid].decoding
    alone = router._budgets([first])
    router.running.remove(router._by_rid[joining.rid])
    assert router._budgets([first]) == alone
    assert alone[first.rid] < RouterConfig().num_draft_tokens


def test_a_request_that_priced_itself_out_tries_again_later() -> None:
    """Ten failed chains of four: the request's own record says ~0 and at light load its budget drops to
    0. Steps without drafts fade that record until the drafter-wide rate (~0.3 a node) prices it back in;
    a record that never faded would keep it at 0 for the rest of the request."""
    drafter = stats([30, 20, 10, 5], [100, 100, 100, 100])
    recent = RecentAcceptance()
    for _ in range(10):
        recent.record(DraftTree.chain([1, 2, 3, 4]), accepted=0)
    light = {"base_tokens": 1.0, "row_ratio": 0.1, "max_nodes": 64}
    assert draft_budgets({1: acceptance_by_depth(recent, drafter, 4)}, **light) == {1: 0}
    steps = 0
    while draft_budgets({1: acceptance_by_depth(recent, drafter, 4)}, **light)[1] == 0:
        recent.record(None, accepted=0)  # a plain decode step
        steps += 1
        assert steps < 60, "the record never faded"
    assert steps >= 5  # not at once: the failures still count for a while
