"""Turns a scheduled step into flat tensors, runs the model once, and returns the logits to sample.

The only engine piece that touches both bookkeeping (sequences, block tables) and torch; it also owns
the paged KV cache tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.engine.config import CacheConfig, ModelConfig
from specserve.engine.model import KVCache, LlamaModel
from specserve.engine.scheduler import ScheduledSeq
from specserve.kernels.paged_attention import build_attention_metadata


def allocate_kv_cache(model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype) -> KVCache:
    shape = (cache_config.num_blocks * cache_config.block_size, model_config.num_kv_heads, model_config.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(model_config.num_layers)]


@dataclass
class StepBatch:
    """Flat tensors of one forward (ragged: no padding)."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    logits_indices: torch.Tensor  # [num_sampling] int64, last row of every sequence that samples


class ModelRunner:
    def __init__(self, model: LlamaModel, cache_config: CacheConfig, kv_dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.cache_config = cache_config
        self.kv_cache = allocate_kv_cache(model.config, cache_config, kv_dtype)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        for s in scheduled:
            start = s.seq.num_computed_tokens
            input_ids += s.seq.token_ids_slice(start, start + s.num_new_tokens)
            positions += range(start, start + s.num_new_tokens)
            if s.samples:
                logits_indices.append(len(input_ids) - 1)
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        )

    def execute(
        self, scheduled: list[ScheduledSeq], return_hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits `# [num_sampling, vocab]` for the sequences whose chunk ends at their last token."""
        batch = self.prepare(scheduled)
        meta = build_attention_metadata(
            query_lens=[s.num_new_tokens for s in scheduled],
            context_lens=[s.seq.num_computed_tokens + s.num_new_tokens for s in scheduled],
            block_tables=[s.seq.block_table for s in scheduled],
            block_size=self.cache_config.block_size,
        )
        return self.model(batch.input_ids, batch.positions, self.kv_cache, meta, batch.logits_indices, return_hidden)
