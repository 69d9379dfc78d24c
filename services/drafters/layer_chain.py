"""Greedy draft chains from a stack of decoder layers with its own paged K/V: the machinery the early-exit
drafter (the target's own first L layers, drafters/early_exit.py) and the distilled draft model (a trained
shallow model, drafters/draft_model.py) share.

Per sequence the drafter remembers which tokens have K/V in its cache; a call keeps the longest prefix the
new history shares with them (rejected drafts are rolled back by forgetting them, their slots are
overwritten later), runs one ragged forward over every sequence's missing tokens (the catch-up: accepted
tokens and the root), then one batched forward per further draft token. For greedy requests drafts are
argmax, deterministic given the history: the verifier treats them as point masses; `draft_probs` holds
the drafter's softmax probability of each chosen token and only ranks paths. For sampling requests each
token is drawn from the drafter's own distribution at the request's settings and that distribution goes
with the tree (drafters/sampling.py). Its cache is not the engine's, so the drafter could run as a
separate drafter service.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from specserve.drafters.base import DraftRequest, common_prefix_len
from specserve.drafters.sampling import draft_generator, sample_children, samples
from specserve.engine.config import CacheConfig
from specserve.engine.draft_tree import DraftTree, SparseDist
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.errors import InvalidRequestError
from specserve.kernels.paged_attention import build_attention_metadata


@dataclass(frozen=True)
class ChainConfig:
    max_depth: int = 8  # longest chain drafted per call (the request's budget may cut it shorter)
    # The chain ends at the first token whose draft probability is below this; that token is still
    # proposed (verifying it costs a row, drafting past it a forward). 0 always drafts to full depth.
    min_confidence: float = 0.9
    # The drafter's own paged K/V for its layers, shared by all sequences; a sequence it cannot hold
    # gets no draft. 1024 blocks of 16 slots hold 16k tokens (the engine's default holds 32k).
    cache: CacheConfig = CacheConfig(num_blocks=1024)

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise InvalidRequestError(f"draft max_depth must be >= 1, got {self.max_depth}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise InvalidRequestError(f"draft min_confidence must be in [0, 1], got {self.min_confidence}")


# The trained chain drafters' settings (draft model, exit head): a trained drafter's confidence ranks its
# guesses better than an untrained exit's, and short chains waste fewer draft forwards (drafters/draft_model.py
# has the measurements).
TRAINED_CHAIN = ChainConfig(min_confidence=0.4, max_depth=4)


@dataclass
class _DraftState:
    """One sequence in the drafter's cache."""

    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V are cached, in order
    block_table: list[int] = field(default_factory=list)  # drafter cache blocks holding them


class LayerChainDrafter:
    """Draft chains of `model` run over its first `num_layers` layers (then its norm and LM head).

    `token_map` `# [draft_vocab]`, when given, names the target token of each LM-head row (a model whose
    head covers a reduced draft vocabulary); without it, row i is token i.
    """

    name = "layer-chain"
    needs_hidden = False

    def __init__(self, model: LlamaModel, num_layers: int, config: ChainConfig,
                 token_map: torch.Tensor | None = None) -> None:
        assert 1 <= num_layers <= model.config.num_layers
        self.model = model
        self.config = config
        self.token_map = token_map
        shallow = replace(model.config, num_layers=num_layers)
        self.kv_cache = allocate_kv_cache(shallow, config.cache, torch.float32)
        self.free_blocks = list(range(config.cache.num_blocks))
        self.states: dict[int, _DraftState] = {}

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        depths = [self._reserve(r) for r in requests]  # 0: no room in the drafter's cache, no draft
        live = [i for i, depth in enumerate(depths) if depth > 0]
        trees = [DraftTree() for _ in requests]
        if live:
            states = [self.states[requests[i].seq_id] for i in live]
            chains = self._draft_chains(states, [requests[i] for i in live], [depths[i] for i in live])
            for i, chain in zip(live, chains):
                trees[i] = chain
        return trees

    def release(self, seq_id: int) -> None:
        state = self.states.pop(seq_id, None)
        if state is not None:
            self.free_blocks.extend(state.block_table)

    def _reserve(self, request: DraftRequest) -> int:
        """Sync `request`'s state with its history and give it blocks for the chain it may draft.

        Returns that chain's depth; 0 when the cache cannot hold it, and then the state is dropped.
        """
        assert request.budget >= 1 and request.token_ids, "a draft request has a root and a budget"
        depth = min(request.budget, self.config.max_depth)
        state = self.states.setdefault(request.seq_id, _DraftState())
        # The root is always recomputed: its logits give the first draft token.
        del state.token_ids[common_prefix_len(state.token_ids, request.token_ids[:-1]):]
        # Slots for the history and the drafted tokens fed back (all but the last one).
        num_slots = len(request.token_ids) + depth - 1
        assert num_slots <= self.model.config.max_position_embeddings, "the chain runs past the context"
        needed = -(-num_slots // self.config.cache.block_size) - len(state.block_table)
        if needed > len(self.free_blocks):
            self.release(request.seq_id)
            return 0
        for _ in range(needed):
            state.block_table.append(self.free_blocks.pop())
        return depth

    def _draft_chains(
        self, states: list[_DraftState], requests: list[DraftRequest], depths: list[int]
    ) -> list[DraftTree]:
        """A chain after each request's history, of at most `depths[k]` tokens: argmax, or sampled."""
        # Catch-up: every token the cache lacks, root included, in one ragged forward.
        logits = self._extend(states, [r.token_ids[len(state.token_ids):] for state, r in zip(states, requests)])
        tokens: list[list[int]] = [[] for _ in states]
        probs: list[list[float]] = [[] for _ in states]
        dists: list[dict[int, SparseDist]] = [{} for _ in states]
        generators = {k: draft_generator(r.sampling, len(r.token_ids))  # sampling requests only
                      for k, r in enumerate(requests) if samples(r.sampling)}
        drafting = list(range(len(states)))
        while drafting:
            top_probs, top_rows = logits.softmax(dim=-1).max(dim=-1)
            top_tokens = top_rows if self.token_map is None else self.token_map[top_rows]
            for row, (k, token, prob) in enumerate(zip(drafting, top_tokens.tolist(), top_probs.tolist())):
                if k in generators:  # drawn at row len(tokens[k]): the root's, then each drafted node's
                    (token,), (prob,), dists[k][len(tokens[k])] = sample_children(
                        logits[row], requests[k].sampling, 1, generators[k], self.token_map)
                tokens[k].append(token)
                probs[k].append(prob)
            confident = self.config.min_confidence
            drafting = [k for k in drafting if len(tokens[k]) < depths[k] and probs[k][-1] >= confident]
            if drafting:
                logits = self._extend([states[k] for k in drafting], [[tokens[k][-1]] for k in drafting])
        return [DraftTree.chain(t, p, d) for t, p, d in zip(tokens, probs, dists)]

    def _extend(self, states: list[_DraftState], new_token_ids: list[list[int]]) -> torch.Tensor:
        """Run each state's new tokens through the layers after its cached ones, writing their K/V, and
        append them to the state. Logits of each state's last new token `# [len(states), lm-head rows]`."""
        starts = [len(s.token_ids) for s in states]
        query_lens = [len(t) for t in new_token_ids]
        assert min(query_lens) >= 1, "every state runs at least its root"
        meta = build_attention_metadata(
            query_lens=query_lens,
            context_lens=[start + q for start, q in zip(starts, query_lens)],
            block_tables=[s.block_table for s in states],
            block_size=self.config.cache.block_size,
        )
        input_ids = torch.tensor([t for ids in new_token_ids for t in ids], dtype=torch.int64)  # [num_tokens]
        positions = torch.cat([torch.arange(start, start + q) for start, q in zip(starts, query_lens)])  # same
        last_rows = torch.tensor(query_lens).cumsum(0) - 1  # [len(states)]
        for state, ids in zip(states, new_token_ids):
            state.token_ids.extend(ids)
        logits, _ = self.model(input_ids, positions, self.kv_cache, meta, last_rows)  # as many layers as caches
        return logits
