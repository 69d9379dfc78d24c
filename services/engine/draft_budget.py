"""How many tokens each speculating request may draft this step: the cost-aware speculation budget.

Used by the router (router/core.py, over its verifier replicas) and by the in-process engine
(engine/llm_engine.py, `SpecConfig.speculation_budget`). A decode/verify forward over S sequences and R
query rows takes about t0 + t_seq * S + t1 * R seconds (`StepCost`, fitted online from the forwards
without prefill chunks: the router's Verify calls, the engine's own steps), and drafting costs a step
about t_draft more (the Propose round trip or the drafter call, measured). What a row costs depends on
the host: where decoding is bound by memory bandwidth 1-6 rows cost about one decode; on a 2-core Zen 5
EPYC with ~48 GB/s each extra row adds ~3-4% of a float32 decode and ~12% of an int8 one. A drafted
node at depth d of request s is accepted with probability p(s, d) (`acceptance_by_depth`: the request's
recent record, shrunk towards its drafter's).
Adding the node adds p(s, d) expected tokens for t1 more seconds, so it pays while

    p(s, d) / t1  >  MARGIN * tokens / time        (the step's throughput without it)

`draft_budgets` adds nodes best-first while that holds, then keeps them only if the whole draft also
pays for t_draft. Only ratios to the step's time matter. Light load: a step is mostly its fixed cost,
so even unlikely nodes pay. Heavy load or
poor acceptance: no node pays, every budget is 0, and the step sends no Propose at all (plain decoding,
no drafting cost). MARGIN > 1 because the linear model underestimates a row's cost once the forward is
compute-bound (measured on 2 CPU cores: ~0.4 ms per extra row for one sequence, ~1.4-1.8 ms at 16).
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np

from specserve.engine.draft_tree import DraftTree
from specserve.engine.verify import SpecStats, count_depths

# t1 / t0 before there are measurements: verifying 16 rows costs about 1.8x one row on the CPUs we
# measured (docs/benchmarks.md), i.e. t1 ~ 0.05 t0.
PRIOR_COST_RATIO = 0.05
PRIOR_WEIGHT = 2.0  # how many drafted nodes of evidence the drafter-wide rate counts as, per request
# A request's own record fades by this factor at each of its decode steps, drafted or not: it reflects
# the last ~10 steps, and one that stopped drafting drifts back to its drafter's rate and tries again.
RECENT_DECAY = 0.9
MARGIN = 1.25  # a node must beat the step's throughput by this factor


class StepCost:
    """Online least-squares fit of a decode/verify forward's time = t0 + t_seq * sequences + t_row * rows
    over the last `window` forwards, and the mean cost of a drafting round. Sequences and rows are kept
    apart because an extra sequence (its own attention, gathers, bookkeeping) costs far more than an
    extra row of a sequence already in the forward, and drafts add only rows."""

    def __init__(self, window: int = 256, refit_every: int = 8) -> None:
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.coef: tuple[float, float, float] | None = None  # (t0, t_seq, t_row) seconds, once fitted
        self.draft_seconds = 0.0  # exponential mean of a step's Propose wall time
        self._since_fit = 0

    def observe(self, seqs: int, rows: int, seconds: float) -> None:
        self.samples.append((seqs, rows, seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self._since_fit = 0
            self._refit()

    def observe_draft(self, seconds: float) -> None:
        self.draft_seconds = seconds if self.draft_seconds == 0.0 else 0.9 * self.draft_seconds + 0.1 * seconds

    def predict(self, seqs: int, rows: int) -> float | None:
        """Seconds of a decode/verify forward over `seqs` sequences and `rows` rows; None before the fit."""
        if self.coef is None:
            return None
        t0, t_seq, t_row = self.coef
        # A fit made at heavy load can extrapolate to a tiny or negative time for a small forward (and
        # then no draft would ever pay, so no evidence would ever correct it): no forward is faster than
        # the fastest one seen.
        return max(t0 + t_seq * seqs + t_row * rows, min(t for _, _, t in self.samples))

    def bound(self, seqs: int, rows: int) -> float | None:
        """A time a forward should take, for deadlines: predict(), or while there is no fit (too few
        forwards, or sequences and rows never varied apart, as with a static draft length) the slowest
        forward seen; None before any."""
        predicted = self.predict(seqs, rows)
        if predicted is None and self.samples:
            return max(t for _, _, t in self.samples)
        return predicted

    def ratios(self, seqs: int, rows: int) -> tuple[float, float]:
        """(t_row, t_draft) as fractions of the predicted time of a forward over `seqs` sequences and
        `rows` rows; the prior (PRIOR_COST_RATIO, 0) until the fit exists."""
        time = self.predict(seqs, rows)
        if time is None:
            return PRIOR_COST_RATIO, 0.0
        return min(max(self.coef[2] / time, 1e-3), 1.0), self.draft_seconds / time

    def _refit(self) -> None:
        x = np.array([[1.0, s, r] for s, r, _ in self.samples])
        y = np.array([t for _, _, t in self.samples])
        if np.linalg.matrix_rank(x) == 3:
            (t0, t_seq, t_row), *_ = np.linalg.lstsq(x, y, rcond=None)
        elif len(set(x[:, 1])) == 1 and len(set(x[:, 2])) > 1:
            # One batch size throughout (batch 1 most often): t_seq * sequences is part of t0.
            (t0, t_row), *_ = np.linalg.lstsq(x[:, [0, 2]], y, rcond=None)
            t_seq = 0.0
        else:  # sequences and rows never varied apart: not identifiable
            return
        if t_row > 0:  # ratios() bounds the predicted time from below
            self.coef = (float(t0), float(t_seq), float(t_row))


class RecentAcceptance:
    """A request's drafted and accepted nodes by depth, faded by RECENT_DECAY at each decode step.

    Without fading, a request whose early drafts failed would price itself out for good: no drafts, no
    new evidence, even after the text turns to something its drafter predicts well. Fading lets its
    estimate return to the drafter-wide rate, which drafts again where rows are cheap (light load) and
    not where they are dear."""

    def __init__(self) -> None:
        self.accepted_by_depth: list[float] = []
        self.nodes_by_depth: list[float] = []

    def record(self, tree: DraftTree | None, accepted: int) -> None:
        self.accepted_by_depth = [a * RECENT_DECAY for a in self.accepted_by_depth]
        self.nodes_by_depth = [n * RECENT_DECAY for n in self.nodes_by_depth]
        if tree is None or tree.num_nodes == 0:
            return
        count_depths(self.nodes_by_depth, tree.depths())
        count_depths(self.accepted_by_depth, range(1, accepted + 1))


def acceptance_by_depth(own: SpecStats | RecentAcceptance, drafter: SpecStats, max_depth: int) -> list[float]:
    """p(d) for d = 1..max_depth: the chance a drafted node at depth d is accepted (the accepted path
    runs through it), from the request's own verify steps shrunk towards the drafter-wide rate (itself
    Laplace-smoothed); made non-increasing in d, as a path cannot reach d + 1 without d.

    Counted per node, not per tree: a drafter that spends its budget on sibling branches drafts several
    nodes at a depth of which at most one is accepted, and each of them costs a row."""
    out: list[float] = []
    for d in range(max_depth):
        prior = (_at(drafter.accepted_by_depth, d) + 1.0) / (_at(drafter.nodes_by_depth, d) + 2.0)
        p = (_at(own.accepted_by_depth, d) + PRIOR_WEIGHT * prior) / (_at(own.nodes_by_depth, d) + PRIOR_WEIGHT)
        out.append(min(p, out[-1]) if out else p)
    return out


def _at(counts: list[int], i: int) -> float:
    return float(counts[i]) if i < len(counts) else 0.0


def draft_budgets(acceptance: dict[int, list[float]], base_tokens: float, row_ratio: float, max_nodes: int,
                  draft_ratio: float = 0.0) -> dict[int, int]:
    """Nodes per request (by id) that pay for themselves, best first, at most `max_nodes` in all.

    `acceptance[rid]`: p(d) by depth (non-increasing; its length caps the request's budget);
    `base_tokens`: the step's expected tokens without any draft (one per decoding sequence); `row_ratio`
    and `draft_ratio`: one more row's time and the drafting round's, as fractions of the step's time
    without drafts (`StepCost.ratios`)."""
    budgets = {rid: 0 for rid in acceptance}
    heap = [(-p[0], rid) for rid, p in acceptance.items() if p]
    heapq.heapify(heap)
    added, tokens = 0, base_tokens
    while heap and added < max_nodes:
        neg_p, rid = heapq.heappop(heap)
        p = -neg_p
        if p * (1.0 + row_ratio * added) <= MARGIN * row_ratio * tokens:  # p / t_row <= MARGIN tokens / time
            break
        budgets[rid] += 1
        added, tokens = added + 1, tokens + p
        depth = budgets[rid]
        if depth < len(acceptance[rid]):
            heapq.heappush(heap, (-acceptance[rid][depth], rid))
    # Throughputs in tokens per base step: the draft must also pay for its drafting round.
    if added and tokens / (1.0 + row_ratio * added + draft_ratio) <= base_tokens:
        return {rid: 0 for rid in budgets}
    return budgets
