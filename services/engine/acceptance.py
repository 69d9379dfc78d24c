"""Acceptance rules: which drafted path of one sequence's DraftTree the target keeps, and the token it adds.

Pure functions over one tree and the target's per-row outputs of a verify forward: row 0 scores the
root, row 1 + i scores node i, so node i's token continues row `1 + parents[i]` (the root's row is 0).
Greedy matches the argmax; lossless is exact rejection sampling; lossy is an opt-in, budgeted relaxation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.sampler import draw
from specserve.errors import InvalidRequestError

# Per row, the q its children were sampled from: {row: [vocab]} for some rows, or a dense [rows, vocab].
DraftDists = Mapping[int, torch.Tensor] | torch.Tensor

# A residual with less mass than this is rounding noise: p and q are equal up to float error, so the
# rejection that led to it had (at most) this probability. See `_residual`.
_MIN_RESIDUAL_MASS = 1e-6


@dataclass
class Acceptance:
    """The outcome of one verify step for one sequence: accepted + 1 emitted tokens."""

    accepted_nodes: list[int]  # [num_accepted] node indices of the accepted path, depth 1 first
    accepted_tokens: list[int]  # [num_accepted] their drafted tokens
    next_token: int  # the target's token at the last accepted node (or the root): bonus or recovered
    recovered: bool  # True: that node's children were all rejected; False: it had none (bonus token)
    divergence: float = 0.0  # lossy only: budget spent by relaxed acceptances this step (nats)

    @property
    def emitted_tokens(self) -> list[int]:
        """What this step appends to the sequence: the accepted tokens, then the bonus/recovered token."""
        return [*self.accepted_tokens, self.next_token]


@dataclass(frozen=True)
class LossyConfig:
    """Relaxed acceptance: also keep a drafted token the exact rule rejects when the target rates it
    nearly as high as its favourite, within a per-sequence divergence budget.

    A token x drafted at a row whose target distribution is p is *relaxable* when p(x) > 0 and
    - `top_k` (default 3; 0 = no rank limit): fewer than `top_k` tokens have p strictly above p(x),
      so x ranks among the target's top_k there (ties included, as in the sampler's top-k), and
    - `min_ratio` (default 0.3; 0 = no ratio limit): p(x) >= min_ratio * max p at that row.
    Keeping it costs log(max p / p(x)) nats (<= -log(min_ratio)), the log-likelihood the target loses
    against its favourite token; 0 for a token tied with the maximum.
    - `budget` (default 8.0): nats a sequence may spend over its whole generation; the engine starts
      each sequence with it and passes what is left to `accept_lossy`. A relaxation is taken only if
      its cost fits in what is left; with nothing left the rule is exactly the lossless/greedy one.
    """

    top_k: int = 3
    min_ratio: float = 0.3
    # Chosen on 200 GSM8K train problems (docs/benchmarks.md, lossy section): 8 nats gave the tau of 32
    # (2.81 against 2.83, lossless 2.13) for a quarter of the divergence a request may spend.
    budget: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"lossy top_k must be an integer >= 0 (0 = no rank limit), got {self.top_k!r}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise InvalidRequestError(f"lossy min_ratio must be in [0, 1] (0 = no ratio limit), got {self.min_ratio}")
        if not 0.0 <= self.budget < math.inf:
            raise InvalidRequestError(f"lossy budget must be a finite number of nats >= 0, got {self.budget}")


class _RowOutcome(NamedTuple):
    """What a rule decides at one row: the accepted child, or None and the token the target emits there."""

    child: int | None
    token: int = -1  # bonus/recovered token; only meaningful when child is None
    divergence: float = 0.0  # budget spent to accept `child` (lossy relaxations only)


# (row, children of the row's node in node order) -> outcome
_RowRule = Callable[[int, list[int]], _RowOutcome]


def _walk(tree: DraftTree, rule: _RowRule) -> Acceptance:
    """Descend from the root through accepted children until `rule` accepts none at a row."""
    children = tree.children()
    node, path, spent = ROOT, [], 0.0
    while True:
        outcome = rule(node + 1, children[node])  # node + 1 is its row: ROOT (-1) -> row 0
        spent += outcome.divergence
        if outcome.child is None:
            tokens = [tree.tokens[i] for i in path]
            return Acceptance(path, tokens, outcome.token, recovered=bool(children[node]), divergence=spent)
        path.append(outcome.child)
        node = outcome.child


# ---- greedy -------------------------------------------------------------------------------------


def accept_greedy(tree: DraftTree, target_argmax: Sequence[int]) -> Acceptance:  # [1 + num_nodes]
    """Keep the child equal to the target's argmax at each row; the argmax where none matches is the
    recovered token (bonus at a childless node). Emits exactly what plain greedy decoding would."""
    assert len(target_argmax) == 1 + tree.num_nodes, "one argmax per row: the root, then every node"
    return _walk(tree, _greedy_rule(tree, target_argmax))


def _greedy_rule(tree: DraftTree, target_argmax: Sequence[int]) -> _RowRule:
    def rule(row: int, children: list[int]) -> _RowOutcome:
        match = next((c for c in children if tree.tokens[c] == target_argmax[row]), None)
        return _RowOutcome(match, target_argmax[row])

    return rule


# ---- lossless: (recursive) rejection sampling ---------------------------------------------------
#
# One child x drafted from q at a row whose target distribution is p (Leviathan et al. 2023, "Fast
# Inference from Transformers via Speculative Decoding"; Chen et al. 2023): accept x with probability
# min(1, p(x) / q(x)); on rejection draw the recovered token from the residual
#     p'(y) = max(0, p(y) - q(y)) / sum_z max(0, p(z) - q(z)).
# The emitted token then has probability  min(p, q)(y) + (1 - sum_z min(p, q)(z)) p'(y)  =  p(y),
# because 1 - sum min(p, q) = sum max(0, p - q).
#
# Several children x_1..x_m of one row are tried in node order, each against what the previous
# rejections left: recursive rejection sampling (SpecInfer, Miao et al. 2023; EAGLE, Li et al. 2024)
#     p_1 = p;  accept x_k with prob min(1, p_k(x_k) / q_k(x_k));
#     on rejection  p_{k+1} = norm(max(0, p_k - q_k));  all m rejected -> recovered token ~ p_{m+1}.
# SpecInfer draws the children i.i.d. from q (q_k = q); a tree's siblings are distinct, so here they
# are drawn one after another without replacement (Recursive Speculative Decoding, Jeon et al. 2024):
# x_k ~ q_k = q with x_1..x_{k-1} removed and renormalized. Deterministic drafters (n-gram,
# retrieval) propose point masses, q_k = one-hot(x_k): x_k is accepted with prob p_k(x_k), and
# p_{k+1} is p_k with x_k zeroed, renormalized.
# Why the row emits p: given the history before step k, x_k ~ q_k, and (by induction from the last
# child, whose continuation is a draw from p_{m+1}) whatever x_k is, a rejection goes on to emit
# p_{k+1}; the one-child identity then says step k emits p_k, so step 1 emits p. An accepted child's
# subtree was drafted given it, so the walk repeats the rule at the child's row with that row's fresh
# p and q; a childless row draws its bonus token from p.


def accept_lossless(
    tree: DraftTree,
    target_probs: torch.Tensor,  # [1 + num_nodes, vocab] float32, `probs_from_logits` of each row
    draft_dists: DraftDists | None,  # row r -> [vocab] q of row r's children; rows absent (or None): point masses
    generator: torch.Generator | None,  # the request's; None = torch's global RNG
) -> Acceptance:
    """Exact rejection sampling over the tree: the emitted tokens follow the target's distribution.

    Every accept/reject decision and every bonus/recovered draw takes one float64 uniform from
    `generator`, so a seeded request emits the same tokens run after run. A row's `draft_dists` entry is
    only correct for children really sampled from it, without replacement, in node order; children chosen
    deterministically (n-gram or retrieval guesses, a draft model's top-k or argmax) are point masses:
    leave their row out. A dense `[1 + num_nodes, vocab]` tensor gives every row a q.
    """
    _check_rows(tree, target_probs, draft_dists)
    return _walk(tree, _lossless_rule(tree, target_probs, draft_dists, generator))


def _lossless_rule(
    tree: DraftTree,
    target_probs: torch.Tensor,  # [1 + num_nodes, vocab]
    draft_dists: DraftDists | None,
    generator: torch.Generator | None,
) -> _RowRule:
    def rule(row: int, children: list[int]) -> _RowOutcome:
        q = _draft_row(draft_dists, row)
        child, residual = _recursive_rejection(target_probs[row].double(), q, tree, children, generator)
        return _RowOutcome(child) if child is not None else _RowOutcome(None, _draw(residual, generator))

    return rule


def _draft_row(draft_dists: DraftDists | None, row: int) -> torch.Tensor | None:  # [vocab] float64 or None
    if draft_dists is None:
        return None
    if isinstance(draft_dists, torch.Tensor):
        return draft_dists[row].double()
    q = draft_dists.get(row)
    return None if q is None else q.double()


def _check_rows(tree: DraftTree, target_probs: torch.Tensor, draft_dists: DraftDists | None) -> None:
    rows = 1 + tree.num_nodes
    assert target_probs.dim() == 2 and target_probs.shape[0] == rows, "target_probs: [1 + num_nodes, vocab]"
    if isinstance(draft_dists, torch.Tensor):
        assert draft_dists.shape == target_probs.shape, "draft_dists: same shape as target_probs"
    elif draft_dists is not None:
        assert all(0 <= r < rows and q.shape == target_probs.shape[1:] for r, q in draft_dists.items()), \
            "draft_dists: rows of the tree, each [vocab]"
    assert bool(((target_probs.sum(dim=-1) - 1.0).abs() < 1e-4).all()), "target rows are distributions"


def _recursive_rejection(
    p: torch.Tensor,  # [vocab] float64, the row's target distribution
    q: torch.Tensor | None,  # [vocab] float64, the row's draft distribution; None = point masses
    tree: DraftTree,
    children: list[int],  # in node order: the order they were drawn
    generator: torch.Generator | None,
) -> tuple[int | None, torch.Tensor]:  # accepted child, or None and the distribution left to draw from
    for child in children:
        x = tree.tokens[child]
        q_k = _one_hot(x, p) if q is None else q
        assert q_k[x] > 0, f"node {child}: token {x} has draft probability 0, so it cannot have been drafted"
        if _uniform(generator) < p[x] / q_k[x]:  # u in [0, 1): probability min(1, p(x) / q(x)); p(x) = 0 never
            return child, p
        p = _residual(p, q_k, x)
        if q is not None:
            q = _without(q, x)
    return None, p


def _residual(
    p: torch.Tensor,  # [vocab] float64
    q: torch.Tensor,  # [vocab] float64
    rejected: int,  # the token just rejected
) -> torch.Tensor:  # [vocab] float64, sums to 1
    """norm(max(0, p - q)). A rejection needs p(x) < q(x), so the residual has mass, unless p and q
    differ only by rounding; then fall back to p without the rejected token (the exact residual for a
    point-mass draft, and never the token just rejected), or to p when nothing else is left."""
    residual = (p - q).clamp(min=0.0)
    mass = residual.sum()
    if mass >= _MIN_RESIDUAL_MASS:
        return residual / mass
    without = _without(p, rejected)
    return without if without.sum() > 0 else p


def _without(dist: torch.Tensor, token: int) -> torch.Tensor:
    """`dist` with `token` removed and renormalized (all zero when nothing else had mass)."""
    dist = dist.clone()
    dist[token] = 0.0
    total = dist.sum()
    return dist / total if total > 0 else dist


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    dist = torch.zeros_like(like)
    dist[token] = 1.0
    return dist


def _uniform(generator: torch.Generator | None) -> float:
    return torch.rand(1, dtype=torch.float64, generator=generator).item()


def _draw(dist: torch.Tensor, generator: torch.Generator | None) -> int:  # dist: [vocab]
    return int(draw(dist[None], [generator])[0])


# ---- lossy: budgeted relaxation -----------------------------------------------------------------


def accept_lossy(
    tree: DraftTree,
    target_probs: torch.Tensor,  # [1 + num_nodes, vocab] float32, see below
    config: LossyConfig,
    budget_left: float,  # nats this sequence may still spend (starts at config.budget); <= 0: none
    *,
    greedy: bool,
    draft_dists: DraftDists | None = None,  # as in accept_lossless (sampling rows only)
    generator: torch.Generator | None = None,  # as in accept_lossless (sampling rows only)
) -> Acceptance:
    """The exact rule, plus: where it accepts no child at a row, keep the relaxable child (see
    LossyConfig) of highest target probability whose cost fits in the budget left, and spend it.

    The exact rule is greedy matching (`greedy`, temperature-0 requests) or `accept_lossless`. For
    greedy rows `target_probs` must be the target's plain softmax (temperature 1, no filters): its
    argmax is the greedy token and it prices the alternatives (a one-hot would leave nothing to relax).
    For sampling rows it is the filtered distribution `accept_lossless` takes; only children the
    rejection test turned down are relaxed. Returns the nats spent in `divergence`; with budget_left
    <= 0 the result, uniforms drawn included, is the exact rule's.
    """
    _check_rows(tree, target_probs, draft_dists)
    if greedy:
        exact = _greedy_rule(tree, target_probs.argmax(dim=-1).tolist())
    else:
        exact = _lossless_rule(tree, target_probs, draft_dists, generator)
    left = budget_left

    def rule(row: int, children: list[int]) -> _RowOutcome:
        nonlocal left
        outcome = exact(row, children)
        if outcome.child is not None:
            return outcome
        tokens = [tree.tokens[c] for c in children]
        relaxed = _cheapest_relaxable(target_probs[row].double(), tokens, config, left)
        if relaxed is None:
            return outcome
        index, cost = relaxed  # the exact rule's recovered token (already drawn) is dropped
        left -= cost
        return _RowOutcome(children[index], divergence=cost)

    return _walk(tree, rule)


def _cheapest_relaxable(
    p: torch.Tensor,  # [vocab] float64, the row's target distribution
    tokens: list[int],  # the row's drafted tokens, in node order
    config: LossyConfig,
    budget_left: float,
) -> tuple[int, float] | None:  # (index into tokens, cost in nats), or None
    """The relaxable token of highest p(x) (first in node order on ties) whose cost fits the budget."""
    if budget_left <= 0.0 or not tokens:
        return None
    p_max = float(p.max())
    best: tuple[int, float] | None = None
    for index, x in enumerate(tokens):
        p_x = float(p[x])
        rank = int((p > p_x).sum())  # tokens strictly more likely than x
        if p_x <= 0.0 or (config.top_k and rank >= config.top_k) or p_x < config.min_ratio * p_max:
            continue
        cost = math.log(p_max / p_x)
        if cost <= budget_left and (best is None or cost < best[1]):
            best = (index, cost)
    return best
