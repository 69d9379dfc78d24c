"""EAGLE-2 drafting (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft
Trees"): the EAGLE head (learned/eagle_head.py) grows a token tree from the target's hidden states, and
the nodes with the best path scores become the draft.

Pair i >= 1 is (h_{i-1}, t_i) at position i; its feature f_i predicts h_i, and softmax(draft_logits(f_i))
is the draft distribution q of t_{i+1}. For a history t_0 .. t_n (t_n the root) every pair 1..n is built
from verified data, so each sequence keeps the head's K/V of those pairs (the **context**) and a call
only runs the pairs it lacks (the **catch-up**; rolled-back drafts are forgotten by keeping the longest
prefix the new history shares with the old). Then, depth by depth, the `beam` best-scored nodes of the
newest depth are fed back as pairs (f_parent, token) in one tree-masked forward, and each gets its
`top_k` most likely children. A node's **path score** is the product of q along its path; the
`budget` best-scored nodes are the draft (EAGLE-2's reranking). Tree K/V live for one call only.

For greedy requests drafts are top-k, deterministic given the history: the verifier treats drafted
tokens as point masses; `draft_probs` holds each node's q(token | path) and only ranks paths. For
sampling requests the draft has a fixed shape, `sample_width` root children drawn from the head's q
without replacement and a chain under the first, each token drawn from q given its path at the
request's settings, and q goes with the tree (drafters/sampling.py). A fixed shape, because EAGLE-2's
reranking keeps children by their values, which would bias what a sampled row stands for.
v1 loops over the sequences of a call (one catch-up and up to max_depth - 1 tree forwards each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specserve.drafters.base import DraftRequest, common_prefix_len
from specserve.drafters.sampling import draft_generator, sample_children, samples
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.quant import apply_weight_dtype, decode_linear
from specserve.errors import InvalidRequestError
from specserve.learned.eagle_head import KV, EagleHead

# Smallest draft probability kept: a top-k probability that underflows to 0 still names a real child.
_MIN_PROB = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class EagleDraftConfig:
    top_k: int = 8  # children drafted per expanded node (and depth-1 candidates from the root)
    beam: int = 4  # nodes expanded per depth: the newest depth's best path scores
    max_depth: int = 6  # deepest node drafted (max_depth - 1 tree forwards per call at most)
    # Weights of the head's linears and draft LM head while drafting. A draft forward reads ~36 MB of
    # float32 weights for a few rows, so it is memory-bound: bfloat16 cut drafting time ~30% (8 Spec-Bench
    # prompts, budget 5: 2.0 -> 1.4 s of 14 s) at the same tau (1.65 / 1.64). Drafts are only proposals
    # the target verifies, so this never changes the output; "float32" gives the head's exact q.
    dtype: str = "bfloat16"
    # Sampling requests: root children drawn from q without replacement (then a chain under the first).
    # At T=1, budget 5, 12 Spec-Bench prompts: tau 1.26 guessing (top-k tree, point masses), 1.34 / 1.39 /
    # 1.37 sampling with width 3 / 4 / 5 (8 prompts: 1.31 / 1.30 / 1.39 for width 1 / 2 / 3), tok/s
    # within noise of guessing in both runs: the sampled chain's forwards and draws cost what tau gains.
    sample_width: int = 4

    def __post_init__(self) -> None:
        if min(self.top_k, self.beam, self.max_depth, self.sample_width) < 1:
            raise InvalidRequestError(
                f"eagle top_k, beam and max_depth must be >= 1, got {self.top_k}, {self.beam}, {self.max_depth}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise InvalidRequestError(f"eagle dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass
class _Context:
    """One sequence's verified pairs in the head's layer."""

    token_ids: list[int] = field(default_factory=list)  # t_0 .. t_m; pairs 1..m have K/V
    kv: KV | None = None  # each [1, num_kv_heads, m, head_dim]; row i - 1 = pair i


@dataclass
class _Candidates:
    """Every node grown in one call, in creation order (depth by depth, so parents come first)."""

    tokens: list[int] = field(default_factory=list)  # [num_candidates] target token ids
    parents: list[int] = field(default_factory=list)  # [num_candidates] candidate index, ROOT for depth 1
    depths: list[int] = field(default_factory=list)  # [num_candidates]
    probs: list[float] = field(default_factory=list)  # [num_candidates] q(token | path), in (0, 1]
    scores: list[float] = field(default_factory=list)  # [num_candidates] product of probs along the path

    def add_children(self, parent: int, tokens: list[int], probs: list[float]) -> list[int]:
        """Append `parent`'s children; their candidate indices."""
        depth, score = (1, 1.0) if parent == ROOT else (self.depths[parent] + 1, self.scores[parent])
        start = len(self.tokens)
        for token, prob in zip(tokens, probs):
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(depth)
            self.probs.append(prob)
            self.scores.append(score * prob)
        return list(range(start, len(self.tokens)))

    def ranked(self) -> list[int]:
        """Candidate indices best first: higher score, then shallower, then created first."""
        return sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], self.depths[i], i))

    def to_expand(self, newest: list[int], budget: int, beam: int) -> list[int]:
        """The `beam` best of `newest` whose children could still make the budget.

        A child scores at most its parent and is deeper than every current candidate, so a parent that
        does not beat the budget-th best score has no child in the draft, and growing more nodes only
        raises that bar. Skipping such parents leaves the final tree exactly as plain EAGLE-2 expansion
        would, and often saves the later forwards (always at budget 1).
        """
        ranked = self.ranked()
        bar = self.scores[ranked[budget - 1]] if len(ranked) >= budget else -1.0
        hopeful = [i for i in newest if self.scores[i] > bar]
        return sorted(hopeful, key=lambda i: (-self.scores[i], i))[:beam]

    def best_tree(self, budget: int) -> DraftTree:
        """The `budget` best candidates as a tree: parent-closed, as a child never ranks above its parent.

        Built here rather than by `tree_from_path_scores`, whose score ratios can round above 1 where
        q is 1; each node keeps its own q.
        """
        chosen = sorted(self.ranked()[:budget])  # creation order is topological
        index = {old: new for new, old in enumerate(chosen)}
        return DraftTree(
            tokens=[self.tokens[i] for i in chosen],
            parents=[ROOT if self.parents[i] == ROOT else index[self.parents[i]] for i in chosen],
            draft_probs=[self.probs[i] for i in chosen],
        )


class EagleDrafter:
    name = "eagle"
    needs_hidden = True

    def __init__(self, head: EagleHead, config: EagleDraftConfig = EagleDraftConfig()) -> None:
        # The target's decode linears (engine/quant.py) are about twice as fast as nn.Linear at the few
        # rows a draft forward has, and batch-invariant; the swap is in place, on `head`. The draft LM
        # head (a buffer of the target's rows, kept out of the checkpoint) gets one too: 8192 x 576, it
        # was ~70% of a call as a plain float32 matmul.
        self.head = apply_weight_dtype(head.eval(), config.dtype)
        self.draft_lm_head = decode_linear(head.lm_head_rows, None, getattr(torch, config.dtype))
        self.config = config
        self.contexts: dict[int, _Context] = {}

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        return [self._propose_one(r) for r in requests]

    def release(self, seq_id: int) -> None:
        self.contexts.pop(seq_id, None)

    def _propose_one(self, request: DraftRequest) -> DraftTree:
        num_pairs = len(request.token_ids) - 1  # n: pairs 1..n end at the root
        assert request.budget >= 1 and num_pairs >= 0, "a draft request has a root and a budget"
        hidden = request.hidden_states
        assert hidden is not None and hidden.shape[0] >= num_pairs, "the engine sends h of every non-root token"
        if num_pairs == 0:  # a lone root has no pair yet (no h before it)
            return DraftTree()
        context = self.contexts.setdefault(request.seq_id, _Context())
        root_feature = self._catch_up(context, request.token_ids, hidden[:num_pairs])
        assert context.kv is not None
        if samples(request.sampling):
            return self._sampled_tree(context.kv, root_feature, num_pairs, request)
        return self._grow(context.kv, root_feature, num_pairs, request.budget)

    def _catch_up(self, context: _Context, token_ids: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """Bring `context` to the pairs 1..n of `token_ids` and return the root's feature f_n `# [hidden]`.

        Pair i is valid while t_0 .. t_i match (h_{i-1} depends on them); the root's pair is always rerun,
        as its feature is not stored.
        """
        num_pairs = len(token_ids) - 1
        kept = max(common_prefix_len(context.token_ids, token_ids[:-1]) - 1, 0)  # pairs 1..kept stay
        past = None if context.kv is None or kept == 0 else (context.kv[0][:, :, :kept], context.kv[1][:, :, :kept])
        num_new = num_pairs - kept
        positions = torch.arange(kept + 1, num_pairs + 1)  # [num_new] pair i sits at position i
        mask = None
        if past is not None and num_new > 1:  # every kept pair, causal among the new ones
            mask = torch.cat([torch.ones(num_new, kept, dtype=torch.bool),
                              torch.ones(num_new, num_new, dtype=torch.bool).tril()], dim=1)[None, None]
        new_tokens = torch.tensor(token_ids[kept + 1 :])  # [num_new] t_i
        features, kv = self.head(hidden[kept:][None].float(), new_tokens[None], positions[None], past, mask)
        context.kv = kv if past is None else (torch.cat([past[0], kv[0]], 2), torch.cat([past[1], kv[1]], 2))
        context.token_ids = list(token_ids)
        return features[0, -1]

    def _grow(self, context_kv: KV, root_feature: torch.Tensor, num_pairs: int, budget: int) -> DraftTree:
        """EAGLE-2's dynamic tree after a root whose feature is `root_feature` `# [hidden]`: expand, rerank."""
        config, head = self.config, self.head
        # A child ranked below `budget` among its siblings never makes the draft.
        top_k = min(config.top_k, budget, head.config.draft_vocab_size)
        # The pair of a depth-d node sits at position n + d: stay inside the rotary table.
        max_depth = min(config.max_depth, head.config.max_position_embeddings - num_pairs)
        nodes = _Candidates()
        newest = nodes.add_children(ROOT, *self._top_children(root_feature[None], top_k)[0])
        features = {ROOT: root_feature}  # expanded node (or the root) -> its pair's feature, [hidden]
        tree_rows: dict[int, int] = {}  # expanded node -> its row in tree_kv
        tree_kv = (context_kv[0][:, :, :0], context_kv[1][:, :, :0])  # each [1, Hkv, num_expanded, D]
        for depth in range(1, max_depth):
            expand = nodes.to_expand(newest, budget, config.beam)
            if not expand:
                break
            mask = self._tree_mask(nodes, expand, tree_rows, num_pairs)
            past = (torch.cat([context_kv[0], tree_kv[0]], 2), torch.cat([context_kv[1], tree_kv[1]], 2))
            prev = torch.stack([features[nodes.parents[i]] for i in expand])[None]  # [1, num_expand, hidden]
            tokens = torch.tensor([nodes.tokens[i] for i in expand])[None]  # [1, num_expand]
            positions = torch.full_like(tokens, num_pairs + depth)
            out, kv = head(prev, tokens, positions, past, mask)  # out [1, num_expand, hidden]
            tree_kv = (torch.cat([tree_kv[0], kv[0]], 2), torch.cat([tree_kv[1], kv[1]], 2))
            newest = []
            for row, (node, children) in enumerate(zip(expand, self._top_children(out[0], top_k))):
                features[node] = out[0, row]
                tree_rows[node] = len(tree_rows)
                newest += nodes.add_children(node, *children)
        return nodes.best_tree(budget)

    def _sampled_tree(self, past: KV, root_feature: torch.Tensor, num_pairs: int,
                      request: DraftRequest) -> DraftTree:
        """After the root whose feature is `root_feature` `# [hidden]`: `sample_width` root children drawn
        from q without replacement, then a chain under the first of them, each token drawn from q given
        its path. How many children a row gets never depends on what they turn out to be.

        The depth-d token's pair (f of its parent, token) sits at position n + d and attends the context
        and the chain's earlier pairs, as the tree forwards of `_grow` do for one branch.
        """
        params = request.sampling
        generator = draft_generator(params, len(request.token_ids))
        max_depth = min(self.config.max_depth, self.head.config.max_position_embeddings - num_pairs)
        width = min(self.config.sample_width, request.budget)
        logits = self.draft_lm_head(root_feature[None])[0]  # [draft_vocab]
        tokens, probs, dist = sample_children(logits, params, width, generator, self.head.token_map)
        parents, dists = [ROOT] * len(tokens), {0: dist}
        feature, node = root_feature, 0  # the chain grows under node 0, the first root child drawn
        for depth in range(2, min(max_depth, request.budget - len(tokens) + 1) + 1):
            position = torch.tensor([[num_pairs + depth - 1]])  # node `node`'s pair, at depth - 1
            out, kv = self.head(feature[None, None], torch.tensor([[tokens[node]]]), position, past, None)
            past = (torch.cat([past[0], kv[0]], 2), torch.cat([past[1], kv[1]], 2))
            feature = out[0, 0]
            logits = self.draft_lm_head(feature[None])[0]
            (token,), (prob,), dists[1 + node] = sample_children(logits, params, 1, generator, self.head.token_map)
            tokens.append(token)
            probs.append(prob)
            parents.append(node)
            node = len(tokens) - 1
        return DraftTree(tokens, parents, probs, dists)

    def _top_children(self, features: torch.Tensor, k: int) -> list[tuple[list[int], list[float]]]:
        """Per row of `features` `# [rows, hidden]`: its k likeliest next target tokens and their q."""
        probs = self.draft_lm_head(features).softmax(dim=-1)  # [rows, draft_vocab], = head.draft_logits
        top = probs.topk(k, dim=-1)
        tokens = self.head.token_map[top.indices].tolist()  # [rows, k] target ids
        return list(zip(tokens, top.values.clamp_min(_MIN_PROB).tolist()))

    @staticmethod
    def _tree_mask(nodes: _Candidates, expand: list[int], tree_rows: dict[int, int], num_pairs: int) -> torch.Tensor:
        """What each expanded node's row may attend `# [1, 1, num_expand, num_pairs + num_tree + num_expand]`:
        the whole context, its ancestors' tree rows, and itself."""
        num_tree, num_expand = len(tree_rows), len(expand)
        mask = torch.zeros(num_expand, num_pairs + num_tree + num_expand, dtype=torch.bool)
        mask[:, :num_pairs] = True
        for row, node in enumerate(expand):
            mask[row, num_pairs + num_tree + row] = True
            ancestor = nodes.parents[node]
            while ancestor != ROOT:  # every ancestor was expanded, which is how its child came to be
                mask[row, num_pairs + tree_rows[ancestor]] = True
                ancestor = nodes.parents[ancestor]
        return mask[None, None]
