"""Turns a scheduled step into flat tensors, runs the model once, and returns the logits to sample.

The only engine piece that touches both bookkeeping (sequences, block tables) and torch; it also owns
the paged KV cache tensors and, for feature drafters, a hidden-state cache laid out like one layer's K:
slot s holds the target's final-norm hidden state of the token whose K/V are in slot s. Indexed by slot,
it follows the KV everywhere: shared prefix blocks, preemption, and the accepted path's moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.engine.config import CacheConfig, ModelConfig
from specserve.engine.draft_tree import DraftTree
from specserve.engine.model import KVCache, LlamaModel
from specserve.engine.scheduler import ScheduledSeq
from specserve.engine.verify import verify_layout
from specserve.kernels.paged_attention import (
    build_attention_metadata, kv_row_width, resolve_attention_backend, slots_of,
)


def allocate_kv_cache(model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype) -> KVCache:
    """Per layer (K, V), each `# [num_slots, num_kv_heads, row width]`: head_dim, or for int8 head_dim
    values and their scale's 4 bytes (kernels/paged_attention.py)."""
    shape = (cache_config.num_blocks * cache_config.block_size, model_config.num_kv_heads,
             kv_row_width(model_config.head_dim, dtype))
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(model_config.num_layers)]


@dataclass
class StepBatch:
    """Flat tensors of one forward (ragged: no padding)."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, RoPE positions (a tree node's: by depth)
    logits_indices: torch.Tensor  # [num_rows] int64: the last row of each sampling sequence, all rows of a tree
    tree_masks: list[list[list[bool]] | None]  # per scheduled sequence, None = causal


class ModelRunner:
    def __init__(
        self, model: LlamaModel, cache_config: CacheConfig, kv_dtype: torch.dtype | None = None,
        batch_invariant: bool = False,
        attention_backend: str = "auto",
        keep_hidden: bool = False,
    ) -> None:
        self.model = model
        self.cache_config = cache_config
        self.batch_invariant = batch_invariant
        kv_dtype = getattr(torch, cache_config.dtype) if kv_dtype is None else kv_dtype  # None: the config's
        self.attention_backend = resolve_attention_backend(attention_backend, kv_dtype)
        self.kv_cache = allocate_kv_cache(model.config, cache_config, kv_dtype)
        num_slots = cache_config.num_blocks * cache_config.block_size
        # [num_slots, hidden] float32, only for drafters that read the target's hidden states.
        self.hidden_cache = torch.zeros(num_slots, model.config.hidden_size) if keep_hidden else None

    def prepare(self, scheduled: list[ScheduledSeq], trees: list[DraftTree | None]) -> StepBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        tree_masks: list[list[list[bool]] | None] = []
        for s, tree in zip(scheduled, trees):
            start = s.seq.num_computed_tokens
            if s.num_draft_tokens:
                assert tree is not None and tree.num_nodes == s.num_draft_tokens and s.num_new_tokens == 1
                layout = verify_layout(s.seq.token_ids_slice(start, start + 1)[0], tree)
                logits_indices += range(len(input_ids), len(input_ids) + len(layout.token_ids))
                input_ids += layout.token_ids
                positions += [start + offset for offset in layout.position_offsets]
                tree_masks.append(layout.tree_mask)
                continue
            input_ids += s.seq.token_ids_slice(start, start + s.num_new_tokens)
            positions += range(start, start + s.num_new_tokens)
            tree_masks.append(None)
            if s.samples:
                logits_indices.append(len(input_ids) - 1)
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
            tree_masks=tree_masks,
        )

    def execute(self, scheduled: list[ScheduledSeq], trees: list[DraftTree | None] | None = None) -> torch.Tensor:
        """Logits `# [num_rows, vocab]`: one row per sampling sequence, 1 + num_nodes rows per tree.
        With a hidden cache, every row's hidden state is stored in its token's slot."""
        trees = trees or [None] * len(scheduled)
        batch = self.prepare(scheduled, trees)
        meta = build_attention_metadata(
            query_lens=[s.num_query_tokens for s in scheduled],
            context_lens=[s.seq.num_computed_tokens + s.num_query_tokens for s in scheduled],
            block_tables=[s.seq.block_table for s in scheduled],
            block_size=self.cache_config.block_size,
            tree_masks=batch.tree_masks,
            batch_invariant=self.batch_invariant,
            backend=self.attention_backend,
        )
        keep_hidden = self.hidden_cache is not None
        logits, hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, meta, batch.logits_indices,
                                    return_hidden=keep_hidden)
        if keep_hidden:
            self.hidden_cache.index_copy_(0, meta.slot_mapping, hidden)
        return logits

    def hidden_states(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """The stored hidden states of a sequence's first `num_tokens` tokens `# [num_tokens, hidden]`."""
        assert self.hidden_cache is not None, "the runner keeps no hidden states"
        return self.hidden_cache[slots_of(block_table, torch.arange(num_tokens), self.cache_config.block_size)]

    def move_kv(self, block_table: list[int], moves: list[tuple[int, int]]) -> None:
        """Copy K/V between positions of one sequence, in every layer (`moves`: (from, to) positions)."""
        if not moves:
            return
        size = self.cache_config.block_size
        sources = slots_of(block_table, torch.tensor([a for a, _ in moves]), size)
        targets = slots_of(block_table, torch.tensor([b for _, b in moves]), size)
        caches = [cache for layer in self.kv_cache for cache in layer]
        for cache in caches + ([self.hidden_cache] if self.hidden_cache is not None else []):
            cache.index_copy_(0, targets, cache.index_select(0, sources))
