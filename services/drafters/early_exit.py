"""Self-speculation by early exit (LITE, Varshney et al. 2024; LayerSkip, Elhoushi et al. 2024): the
target's own first `exit_layer` layers, then its final norm and LM head, draft a greedy chain.

The drafter shares the target's weights (no copy) but keeps its own paged K/V for those layers, so it
could run as a separate drafter service; the engine's cache is not shared. Per sequence it remembers
which tokens have K/V in that cache; a call keeps the longest prefix the new history shares with them
(rejected drafts are rolled back by forgetting them, their slots are overwritten later), runs one
ragged forward over every sequence's missing tokens (the catch-up: accepted tokens and the root),
then one batched forward per further draft token. Drafts are argmax, deterministic given the history:
the verifier treats them as point masses, which keeps sampling lossless; `draft_probs` holds the
early-exit softmax of each chosen token and only ranks paths.

Measured on SmolLM2-135M (30 layers, float32, 2 shared CPU cores; 4 training-set prompts, 64 greedy
tokens, batch 1, budget 8). A draft step costs d = 0.34, 0.46, 0.59, 0.73, 0.87, 0.94 of a full
forward at L = 6, 10, 15, 20, 25, 28: the tied 49k-vocabulary LM head alone costs about 8 layers.
Cost per token is (target forwards + d * draft forwards) / tokens, relative to plain decoding (wall
clocks on this shared machine agreed within their noise). No setting is faster than plain decoding:

    L   min_confidence  tau   cost          L   min_confidence  tau   cost
    6   0               1.06  3.38          20  0               1.29  5.03
    6   0.95            1.06  1.28          20  0.95            1.28  1.45
    10  0               1.10  4.00          25  0               2.36  3.17
    10  0.95            1.09  1.33          25  0.9             1.89  1.39
    15  0               1.15  4.72          28  0.8             2.55  1.20
    15  0.5             1.15  2.39          28  0.9             2.38  1.18
                                            28  0.95            2.26  1.16

Shallow exits cost little and almost never match the target; deep ones match but cost nearly a
forward. The defaults (L = num_layers - EXIT_LAYERS_SKIPPED = 28, min_confidence 0.9) are about the
least slow measured (0.8 to 0.95 is a wash): an untrained exit does not pay on this CPU. Trained exit
heads, and a verifier that reuses the drafter's first-L-layer work instead of recomputing it, are later
issues. A draft forward is the target's own `forward` given only the first L layers' caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from specserve.drafters.base import DraftRequest, common_prefix_len
from specserve.engine.config import CacheConfig
from specserve.engine.draft_tree import DraftTree
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.errors import InvalidRequestError
from specserve.kernels.paged_attention import build_attention_metadata


# The default exit skips the last 2 layers (28 of SmolLM2's 30): the least slow setting measured above.
EXIT_LAYERS_SKIPPED = 2


@dataclass(frozen=True)
class EarlyExitConfig:
    exit_layer: int  # decoder layers the draft runs, 1 .. num_layers - 1 (SpecConfig.exit_layer)
    max_depth: int = 8  # longest chain drafted per call (the request's budget may cut it shorter)
    # The chain ends at the first token whose early-exit probability is below this; that token is still
    # proposed (verifying it costs a row, drafting past it a forward). 0 always drafts to full depth.
    min_confidence: float = 0.9
    # The drafter's own paged K/V for its layers, shared by all sequences; a sequence it cannot hold
    # gets no draft. 1024 blocks of 16 slots hold 16k tokens (the engine's default holds 32k).
    cache: CacheConfig = CacheConfig(num_blocks=1024)

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise InvalidRequestError(f"early-exit max_depth must be >= 1, got {self.max_depth}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise InvalidRequestError(f"early-exit min_confidence must be in [0, 1], got {self.min_confidence}")


@dataclass
class _DraftState:
    """One sequence in the drafter's cache."""

    token_ids: list[int] = field(default_factory=list)  # tokens whose layer 1..L K/V are cached, in order
    block_table: list[int] = field(default_factory=list)  # drafter cache blocks holding them


class EarlyExitDrafter:
    name = "early-exit"
    needs_hidden = False

    def __init__(self, model: LlamaModel, config: EarlyExitConfig) -> None:
        num_layers = model.config.num_layers
        if not 1 <= config.exit_layer < num_layers:
            raise InvalidRequestError(
                f"exit_layer must be in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                f"got {config.exit_layer}"
            )
        self.model = model
        self.config = config
        shallow = replace(model.config, num_layers=config.exit_layer)
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
            chains = self._draft_chains(states, [requests[i].token_ids for i in live], [depths[i] for i in live])
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
        # The root is always recomputed: its early-exit logits give the first draft token.
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
        self, states: list[_DraftState], token_ids: list[list[int]], depths: list[int]
    ) -> list[DraftTree]:
        """Greedy early-exit chains after each history `token_ids[k]`, of at most `depths[k]` tokens."""
        # Catch-up: every token the cache lacks, root included, in one ragged forward.
        logits = self._extend(states, [ids[len(state.token_ids):] for state, ids in zip(states, token_ids)])
        tokens: list[list[int]] = [[] for _ in states]
        probs: list[list[float]] = [[] for _ in states]
        drafting = list(range(len(states)))
        while drafting:
            top_probs, top_tokens = logits.softmax(dim=-1).max(dim=-1)
            for k, token, prob in zip(drafting, top_tokens.tolist(), top_probs.tolist()):
                tokens[k].append(token)
                probs[k].append(prob)
            confident = self.config.min_confidence
            drafting = [k for k in drafting if len(tokens[k]) < depths[k] and probs[k][-1] >= confident]
            if drafting:
                logits = self._extend([states[k] for k in drafting], [[tokens[k][-1]] for k in drafting])
        return [DraftTree.chain(t, p) for t, p in zip(tokens, probs)]

    def _extend(self, states: list[_DraftState], new_token_ids: list[list[int]]) -> torch.Tensor:
        """Run each state's new tokens through the first L layers after its cached ones, writing their
        K/V, and append them to the state. Early-exit logits of each state's last new token
        `# [len(states), vocab]`."""
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
        logits, _ = self.model(input_ids, positions, self.kv_cache, meta, last_rows)  # the first L layers only
        return logits
