"""Medusa drafting: K trained heads (learned/medusa_heads.py) guess the K tokens after the root from the
target's last hidden state, and the likeliest combinations of their guesses become a token tree.

Head k's top_k tokens are the candidates at depth k, whatever came before them (the heads see no drafted
token), so every node at depth k has the same candidate children. A node's **path score** is the product
of its path's head probabilities, and the draft is the `budget` best-scored paths of that Cartesian
product, found best-first with a heap (the k-best enumeration: a popped node offers its first child and
its next sibling, both scoring at most itself, so nodes come out in score order and parents first). This
is Medusa's tree with its structure chosen per step from the heads' own confidence rather than a fixed
calibrated tree.

For greedy requests drafts are top-k, deterministic given the hidden state: the verifier treats drafted
tokens as point masses; `draft_probs` holds each node's head probability and only ranks paths. For
sampling requests the draft is a chain, head k's token drawn from head k's own distribution at the
request's settings, which goes with the tree (drafters/sampling.py): the heads ignore the tokens before
theirs, so that distribution is still exactly the one each token was drawn from. One call runs every
sequence's heads in one batched product. No per-sequence state is kept.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from specserve.drafters.base import DraftRequest
from specserve.drafters.sampling import draft_generator, sample_children, samples
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.quant import decode_linear
from specserve.errors import InvalidRequestError
from specserve.learned.medusa_heads import MedusaHeads, head_features

# Smallest draft probability kept: a top-k probability that underflows to 0 still names a real child.
_MIN_PROB = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class MedusaDraftConfig:
    top_k: int = 8  # candidates per head (children of every node at the head's depth)
    # The draft LM-head product reads 8192 x 576 weights for a few rows, memory-bound: bfloat16 halves it.
    # Drafts are only proposals the target verifies, so this never changes the output.
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise InvalidRequestError(f"medusa top_k must be >= 1, got {self.top_k}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InvalidRequestError(f"medusa dtype must be float32 or bfloat16, got {self.dtype!r}")


def best_paths(tokens: list[list[int]], probs: list[list[float]], budget: int) -> DraftTree:
    """The `budget` best-scored nodes of the tree whose depth-d nodes each have the children `tokens[d]`
    with probabilities `probs[d]` (each sorted, likeliest first); a node scores the product along its path.

    Example: tokens [[7, 8], [9]], probs [[0.6, 0.3], [0.5]], budget 3: 7 (0.6), 8 (0.3), 7->9 (0.3);
    ties go to the shallower node, then the one offered first.
    """
    if budget < 1 or not tokens or not tokens[0]:
        return DraftTree()
    out_tokens: list[int] = []
    parents: list[int] = []
    out_probs: list[float] = []
    node_of: dict[tuple[int, ...], int] = {}  # path of choice indices -> node index
    offered = 0
    # (-score, depth, order offered, path, parent's score): parents first among equal scores
    heap = [(-probs[0][0], 1, offered, (0,), 1.0)]
    while heap and len(out_tokens) < budget:
        neg_score, depth, _, path, parent_score = heapq.heappop(heap)
        node_of[path] = len(out_tokens)
        out_tokens.append(tokens[depth - 1][path[-1]])
        parents.append(node_of[path[:-1]] if depth > 1 else ROOT)
        out_probs.append(probs[depth - 1][path[-1]])
        offers = []
        if path[-1] + 1 < len(tokens[depth - 1]):  # next sibling: same parent, next likeliest token
            sibling_prob = probs[depth - 1][path[-1] + 1]
            offers.append((parent_score * sibling_prob, depth, path[:-1] + (path[-1] + 1,), parent_score))
        if depth < len(tokens) and tokens[depth]:  # first child: the next head's likeliest token
            offers.append((-neg_score * probs[depth][0], depth + 1, path + (0,), -neg_score))
        for score, node_depth, node_path, node_parent_score in offers:
            offered += 1
            heapq.heappush(heap, (-score, node_depth, offered, node_path, node_parent_score))
    return DraftTree(out_tokens, parents, out_probs)


class MedusaDrafter:
    name = "medusa"
    needs_hidden = True

    def __init__(self, heads: MedusaHeads, config: MedusaDraftConfig = MedusaDraftConfig()) -> None:
        self.heads = heads.eval()
        dtype = getattr(torch, config.dtype)
        self.weight = heads.weight.detach().to(dtype)  # [K, out, in]
        self.bias = heads.bias.detach().to(dtype)  # [K, hidden]
        self.draft_lm_head = decode_linear(heads.lm_head_rows, None, dtype)
        self.dtype = dtype
        self.config = config

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        trees = [DraftTree() for _ in requests]
        live = [i for i, r in enumerate(requests) if len(r.token_ids) >= 2]  # a lone root has no h before it
        if not live:
            return trees
        for i in live:
            hidden = requests[i].hidden_states
            assert requests[i].budget >= 1, "a draft request has a budget"
            assert hidden is not None and hidden.shape[0] >= len(requests[i].token_ids) - 1, \
                "the engine sends h of every non-root token"
        last = torch.stack([requests[i].hidden_states[len(requests[i].token_ids) - 2] for i in live])  # [B, hidden]
        logits = self._head_logits(last.to(self.dtype))  # [B, K, draft_vocab]
        top_k = min(self.config.top_k, self.heads.config.draft_vocab_size)
        top = logits.softmax(dim=-1).topk(top_k, dim=-1)  # each [B, K, top_k]
        token_ids = self.heads.token_map[top.indices].tolist()
        probs_list = top.values.clamp_min(_MIN_PROB).tolist()
        for row, i in enumerate(live):
            if samples(requests[i].sampling):
                trees[i] = self._sampled_chain(logits[row], requests[i])
            else:
                trees[i] = best_paths(token_ids[row], probs_list[row], requests[i].budget)
        return trees

    def _sampled_chain(self, logits: torch.Tensor, request: DraftRequest) -> DraftTree:
        """Head k's token drawn from head k's q, for the first `budget` heads (`logits` `# [K, draft_vocab]`)."""
        generator = draft_generator(request.sampling, len(request.token_ids))
        tokens, probs, dists = [], [], {}
        for depth in range(min(logits.shape[0], request.budget)):  # drawn at row `depth`: the root, then nodes
            (token,), (prob,), dists[depth] = sample_children(logits[depth], request.sampling, 1, generator,
                                                              self.heads.token_map)
            tokens.append(token)
            probs.append(prob)
        return DraftTree.chain(tokens, probs, dists)

    def release(self, seq_id: int) -> None:
        pass  # no per-sequence state

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every head's draft-vocabulary logits `# [B, K, draft_vocab]` float32, from `# [B, hidden]`."""
        features = head_features(hidden, self.weight, self.bias)  # [B, K, hidden]
        batch, num_heads, width = features.shape
        return self.draft_lm_head(features.reshape(batch * num_heads, width)).float().view(batch, num_heads, -1)
