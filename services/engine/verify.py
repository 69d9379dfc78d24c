"""Verification of drafted token trees: lay a tree out for the target forward, then keep its accepted path.

One speculating sequence with `ctx` computed tokens, its root r (last token, no KV yet) and nodes 0..n-1:
    query row       r      node 0          ...  node n-1
    cache position  ctx    ctx + 1         ...  ctx + n           where the K/V are written (node order)
    RoPE position   ctx    ctx + depth(0)  ...  ctx + depth(n-1)  the token's position on its path
    tree mask       row 0 sees r; row 1 + i sees r and node i's path (plus, always, the committed context)
After the acceptance rule keeps nodes a_1..a_k (depth 1..k), node a_d's K/V move from cache position
ctx + 1 + a_d to ctx + d; a chain's accepted prefix is already in place, so it moves nothing. Only
the accepted tokens' K/V are copied; the rejected nodes' slots are simply overwritten later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from specserve.engine.acceptance import Acceptance, LossyConfig, accept_greedy, accept_lossless, accept_lossy
from specserve.engine.config import SamplingParams
from specserve.engine.draft_tree import DraftTree
from specserve.engine.sampler import greedy_tokens, probs_from_logits
from specserve.errors import InvalidRequestError


@dataclass
class VerifyLayout:
    """The query rows one tree adds to a verify forward."""

    token_ids: list[int]  # [1 + num_nodes] root, then nodes
    position_offsets: list[int]  # [1 + num_nodes] RoPE position minus ctx: 0, then each node's depth
    tree_mask: list[list[bool]]  # [1 + num_nodes, 1 + num_nodes] row a may attend new token b


def verify_layout(root_token: int, tree: DraftTree) -> VerifyLayout:
    """Example: root 11, tree tokens [5, 9, 7], parents [-1, 0, -1] ->
    token_ids [11, 5, 9, 7], position_offsets [0, 1, 2, 1],
    tree_mask rows [1000], [1100], [1110], [1001] (node 2 = token 7 sees only the root and itself)."""
    ancestors = tree.ancestor_mask()
    mask = [[True] + [False] * tree.num_nodes] + [[True] + row for row in ancestors]
    return VerifyLayout([root_token, *tree.tokens], [0, *tree.depths()], mask)


def kv_moves(accepted_nodes: list[int], num_computed: int) -> list[tuple[int, int]]:
    """(from, to) cache positions that put the accepted path's K/V in sequence order; sources never
    precede their targets, so copying all at once (gather, then scatter) is safe."""
    moves = []
    for depth, node in enumerate(accepted_nodes, start=1):
        source, target = num_computed + 1 + node, num_computed + depth
        if source != target:
            moves.append((source, target))
    return moves


@dataclass
class SpecStats:
    """Speculation counters of one request (or, summed, of the engine)."""

    forwards: int = 0  # target forwards that produced tokens for it (verify steps and plain decodes)
    tokens: int = 0  # tokens those forwards produced
    verify_steps: int = 0  # forwards that verified a non-empty tree
    drafted: int = 0  # drafted nodes verified
    accepted: int = 0  # drafted tokens accepted
    # accepted_by_depth[d - 1]: verify steps whose accepted path reached depth d;
    # reached_by_depth[d - 1]: verify steps whose tree had a node at depth d (the chance to accept there).
    accepted_by_depth: list[int] = field(default_factory=list)
    reached_by_depth: list[int] = field(default_factory=list)
    # nodes_by_depth[d - 1]: drafted nodes at depth d (a tree with branches has several per depth, of
    # which at most one is accepted): accepted_by_depth / nodes_by_depth is one node's chance there.
    nodes_by_depth: list[int] = field(default_factory=list)

    @property
    def mean_accepted_len(self) -> float:
        """tau: tokens per target forward (1.0 without speculation)."""
        return self.tokens / self.forwards if self.forwards else 0.0

    def record(self, tree: DraftTree | None, accepted: int, emitted: int) -> None:
        self.forwards += 1
        self.tokens += emitted
        if tree is None or tree.num_nodes == 0:
            return
        self.verify_steps += 1
        self.drafted += tree.num_nodes
        self.accepted += accepted
        depths = tree.depths()
        count_depths(self.reached_by_depth, range(1, max(depths) + 1))
        count_depths(self.accepted_by_depth, range(1, accepted + 1))
        count_depths(self.nodes_by_depth, depths)

    def add(self, other: SpecStats) -> None:
        for name in ("forwards", "tokens", "verify_steps", "drafted", "accepted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.accepted_by_depth, other.accepted_by_depth),
                             (self.reached_by_depth, other.reached_by_depth),
                             (self.nodes_by_depth, other.nodes_by_depth)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, count in enumerate(theirs):
                mine[i] += count

    def as_dict(self) -> dict:
        accepted = self.accepted_by_depth + [0] * (len(self.reached_by_depth) - len(self.accepted_by_depth))
        rate = [round(a / r, 4) for a, r in zip(accepted, self.reached_by_depth)]
        return {
            "forwards": self.forwards, "verify_steps": self.verify_steps, "drafted": self.drafted,
            "accepted": self.accepted, "mean_accepted_len": round(self.mean_accepted_len, 4),
            "acceptance_by_depth": rate,
        }


def count_depths(counts: list, depths: Iterable[int]) -> None:
    """counts[d - 1] += 1 for each d in `depths` (1-based), growing the list as needed."""
    for depth in depths:
        counts.extend([0] * (depth - len(counts)))
        counts[depth - 1] += 1


def accept(
    tree: DraftTree,
    logits: torch.Tensor,  # [1 + num_nodes, vocab] float32, the target's rows for root and nodes
    params: SamplingParams,
    generator: torch.Generator | None,
    lossy: LossyConfig | None = None,
    lossy_budget_left: float = 0.0,
) -> Acceptance:
    """Apply the request's acceptance rule: greedy match, exact rejection sampling, or (opt-in) lossy."""
    assert logits.shape[0] == 1 + tree.num_nodes
    dists = None if params.greedy else dense_draft_dists(tree, logits.shape[1])
    if lossy is not None and lossy_budget_left > 0:
        # Greedy rows are priced by the plain softmax (a one-hot would leave nothing to relax).
        probs = logits.softmax(dim=-1) if params.greedy else probs_from_logits(logits, [params] * logits.shape[0])
        return accept_lossy(tree, probs, lossy, lossy_budget_left, greedy=params.greedy, draft_dists=dists,
                            generator=generator)
    if params.greedy:
        return accept_greedy(tree, greedy_tokens(logits).tolist())
    probs = probs_from_logits(logits, [params] * logits.shape[0])
    return accept_lossless(tree, probs, dists, generator)


def dense_draft_dists(tree: DraftTree, vocab_size: int) -> dict[int, torch.Tensor] | None:
    """The tree's sampled rows' q as full-vocabulary rows `{row: [vocab] float64}`; None when it has none."""
    if not tree.draft_dists:
        return None
    dense = {}
    for row, (ids, probs) in tree.draft_dists.items():
        if not 0 <= min(ids) <= max(ids) < vocab_size:
            raise InvalidRequestError(f"draft tree row {row}: its draft distribution names a token outside the vocabulary")
        q = torch.zeros(vocab_size, dtype=torch.float64)
        q[torch.tensor(ids)] = torch.tensor(probs, dtype=torch.float64)
        dense[row] = q / q.sum()
    return dense
