"""Token trees: what a drafter proposes and the verifier checks. The speculative vocabulary lives here.

- **root**: a sequence's last token. It has no KV yet; it is the first query row of a verify forward.
- **node**: one drafted token. Node i has a `parent` (-1 = the root) and a **depth** (root = 0, its
  children 1, ...). Nodes are stored in topological order (a parent before its children) and siblings
  carry distinct tokens. A **chain** is a tree in which every node has at most one child.
- **path**: root -> node. Verifying a node means the target scores the path that ends in it.
- **tree mask**: row i, column j true when node j is node i or one of its ancestors; with the
  sequence's committed context, that is exactly what node i's query may attend to.
- **draft probability** (`draft_probs[i]`): the drafter's probability of node i's token given its path,
  q(token | path). 1.0 for a certain guess. The product along a path is the path's **draft score**,
  used to keep the best nodes when a budget is tight (hypothesis reduction).
- **row**: a query row of the verify forward: row 0 is the root, row 1 + i is node i; a row's children
  are the nodes whose parent it is.
- **draft distribution** (`draft_dists[row]`): for a row whose children were *sampled* (drawn one after
  another without replacement, in node order, from a distribution q fixed before the first draw), that
  q as sparse (token ids, probabilities). Lossless acceptance then accepts a child with probability
  min(1, p/q) instead of p alone, which is what lets sampled drafts keep up at temperature > 0. Rows not
  listed hold guesses, treated as point masses; that is exact for any way of choosing them, so a row's
  q may always be dropped, but never kept after its children were thinned by their values.
- **accepted tokens**: the drafted tokens of the longest path the acceptance rule keeps. One more
  token then comes from the target at the last accepted node: the **bonus** token when that node has
  no drafted children (nothing was rejected there), the **recovered** token when its children were
  rejected (greedy: the target's argmax; sampling: a draw from the residual distribution). Each
  verify step so emits accepted + 1 tokens.

Plain Python, no torch: drafters and the router build and read trees without tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = -1  # the parent index of depth-1 nodes
SparseDist = tuple[list[int], list[float]]  # (token ids, their probabilities): absent ids have probability 0


@dataclass
class DraftTree:
    """A drafted token tree for one sequence (parent-index encoding).

    Example: tokens [5, 9, 7], parents [-1, 0, -1] is
        root ─ 5 ─ 9
             └ 7
    node 0 (token 5) and node 2 (token 7) are the root's children; node 1 (token 9) follows 5.
    """

    tokens: list[int] = field(default_factory=list)  # [num_nodes] drafted token ids
    parents: list[int] = field(default_factory=list)  # [num_nodes] parent node index, ROOT for depth 1
    draft_probs: list[float] = field(default_factory=list)  # [num_nodes] q(token | path), in (0, 1]
    # row -> (token ids, probabilities) of the q its children were sampled from; see the module docstring
    draft_dists: dict[int, SparseDist] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.parents) == len(self.draft_probs), "one parent and prob per node"
        seen: set[tuple[int, int]] = set()
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents)):
            assert ROOT <= parent < i, f"node {i}: parent {parent} must come before it (topological order)"
            assert (parent, token) not in seen, f"node {i}: sibling tokens must be distinct"
            seen.add((parent, token))
        assert all(0.0 < p <= 1.0 for p in self.draft_probs), "draft probabilities lie in (0, 1]"
        for row, (ids, probs) in self.draft_dists.items():
            assert 0 <= row <= self.num_nodes, f"draft distribution of row {row}: no such row"
            assert len(ids) == len(probs) and len(set(ids)) == len(ids), f"row {row}: one probability per token id"
            assert all(p >= 0.0 for p in probs) and abs(sum(probs) - 1.0) < 1e-3, f"row {row}: not a distribution"
            support = {t for t, p in zip(ids, probs) if p > 0.0}
            drafted = {token for token, parent in zip(self.tokens, self.parents) if parent + 1 == row}
            assert drafted <= support, f"row {row}: a child outside its draft distribution cannot have been drawn"

    @classmethod
    def chain(cls, tokens: Sequence[int], draft_probs: Sequence[float] | None = None,
              draft_dists: dict[int, SparseDist] | None = None) -> DraftTree:
        """A single branch: tokens[i] follows tokens[i - 1] (and was drawn at row i, when sampled)."""
        probs = [1.0] * len(tokens) if draft_probs is None else list(draft_probs)
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), probs, dict(draft_dists or {}))

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of every node `# [num_nodes]` (children of the root have depth 1)."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent == ROOT else depth[parent] + 1)
        return depth

    def children(self) -> dict[int, list[int]]:
        """Node index (ROOT included) -> its children's indices in node order."""
        kids: dict[int, list[int]] = {ROOT: []}
        for i, parent in enumerate(self.parents):
            kids.setdefault(parent, []).append(i)
            kids.setdefault(i, [])
        return kids

    def path_to(self, node: int) -> list[int]:
        """Node indices from depth 1 down to `node` (empty for ROOT)."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def path_scores(self) -> list[float]:
        """Product of draft probabilities along each node's path `# [num_nodes]`."""
        scores: list[float] = []
        for parent, prob in zip(self.parents, self.draft_probs):
            scores.append(prob * (1.0 if parent == ROOT else scores[parent]))
        return scores

    def ancestor_mask(self) -> list[list[bool]]:
        """Tree mask `# [num_nodes, num_nodes]`: [i][j] true when node j is node i or its ancestor."""
        mask: list[list[bool]] = []
        for i, parent in enumerate(self.parents):
            row = list(mask[parent]) if parent != ROOT else [False] * self.num_nodes
            row[i] = True
            mask.append(row)
        return mask

    def first_path(self) -> list[int]:
        """Tokens of the path that takes the first child at every node, down to a leaf."""
        kids, node, tokens = self.children(), ROOT, []
        while kids[node]:
            node = kids[node][0]
            tokens.append(self.tokens[node])
        return tokens

    def after(self, token: int) -> DraftTree | None:
        """The part below the depth-1 node carrying `token`, with that node as the new root; None when no
        depth-1 node carries it. Example: root ─ 5 ─ 9 ─ 4, root ─ 7; after(5) is root ─ 9 ─ 4."""
        top = next((i for i, p in enumerate(self.parents) if p == ROOT and self.tokens[i] == token), None)
        if top is None:
            return None
        below: dict[int, int] = {top: ROOT}  # old index -> new index (top becomes the root)
        tokens, parents, probs = [], [], []
        for i, parent in enumerate(self.parents):
            if parent in below and i != top:
                below[i] = len(tokens)
                tokens.append(self.tokens[i])
                parents.append(below[parent])
                probs.append(self.draft_probs[i])
        # Every kept node keeps all its children, so its row's q stays valid (old row 1 + i -> new 1 + below[i]).
        dists = {1 + below[row - 1]: dist for row, dist in self.draft_dists.items() if row > 0 and row - 1 in below}
        return DraftTree(tokens, parents, probs, dists)

    def subtree(self, keep: Sequence[int]) -> DraftTree:
        """The tree restricted to `keep` (node indices closed under taking parents), order preserved.

        A row keeps its draft distribution only when it keeps all its children: a cut that may depend on
        the sampled tokens' values (a score ranking, a budget) would bias what the kept ones represent.
        """
        kept = sorted(set(keep))
        new_index = {old: new for new, old in enumerate(kept)}
        assert all(self.parents[i] == ROOT or self.parents[i] in new_index for i in kept), "keep is not parent-closed"
        row_of = {ROOT: 0, **{old: 1 + new for old, new in new_index.items()}}  # kept node (or root) -> new row
        children = self.children()
        dists = {row_of[row - 1]: dist for row, dist in self.draft_dists.items()
                 if row - 1 in row_of and all(c in new_index for c in children[row - 1])}
        return DraftTree(
            [self.tokens[i] for i in kept],
            [ROOT if self.parents[i] == ROOT else new_index[self.parents[i]] for i in kept],
            [self.draft_probs[i] for i in kept],
            dists,
        )


def tree_from_continuations(continuations: Sequence[Sequence[int]], budget: int) -> DraftTree:
    """The `budget` most supported nodes of the trie of `continuations` (each a candidate chain).

    A node's count is how many continuations pass through it; its draft probability is count / parent
    count (the root's count is the number of continuations). Nodes are taken by count, then shallower
    first, then first seen, which keeps the tree parent-closed: a child never outcounts its parent.
    Example: [[4, 5], [4, 6], [7]] with budget 3 -> root ─ 4 (2/3) ─ 5 (1/2), root ─ 7 (1/3).
    """
    counts: dict[tuple[int, ...], float] = {}  # path of tokens -> continuations through it, in first-seen order
    for continuation in continuations:
        for depth in range(1, len(continuation) + 1):
            path = tuple(continuation[:depth])
            counts[path] = counts.get(path, 0) + 1
    return tree_from_path_scores(counts, budget, root_score=len(continuations))


def tree_from_path_scores(
    scores: dict[tuple[int, ...], float], budget: int, root_score: float = 1.0, min_score: float = 0.0
) -> DraftTree:
    """The `budget` best-scored paths (token tuples from depth 1) as a tree.

    Scores must not grow along a path (a child never scores above its parent), so taking them best
    first, then shallower first, then in `scores`' order, gives a parent-closed tree; nodes come out by
    depth, in `scores`' order within a depth. A node's draft
    probability is its score over its parent's (`root_score` for depth 1). Paths scoring below
    `min_score` are never taken.
    """
    order = {path: i for i, path in enumerate(scores)}
    ranked = sorted((p for p in scores if scores[p] >= min_score), key=lambda p: (-scores[p], len(p), order[p]))
    chosen = sorted(ranked[: max(budget, 0)], key=lambda p: (len(p), order[p]))  # parents before children
    index = {path: i for i, path in enumerate(chosen)}
    return DraftTree(
        tokens=[path[-1] for path in chosen],
        parents=[index[path[:-1]] if len(path) > 1 else ROOT for path in chosen],
        draft_probs=[scores[path] / (scores[path[:-1]] if len(path) > 1 else root_score) for path in chosen],
    )
