"""Medusa heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
Decoding Heads", Medusa-1: heads trained on a frozen target).

For a history t_0 .. t_n (t_n the root, just sampled from the target's LM head on h_{n-1}), head k
(k = 1 .. K) reads the same final-norm hidden state h_{n-1} and guesses t_{n+k}, k tokens past the root:
    f_k = h + SiLU(W_k h + b_k)                 (one residual block per head)
    q_k = softmax(lm_head_rows f_k)             (the target's frozen LM-head rows of the draft vocabulary)
No head sees the tokens between: all K guesses come from one hidden row at once, so drafting is K tiny
matmuls and one LM-head product, far cheaper than an EAGLE head's autoregressive layer, at lower
acceptance past the first token. W_k starts at zero (each head starts as the target's own LM head, as in
Medusa). Only W, b and `token_map` are the checkpoint (learned/checkpoint.py); the LM-head rows are the
target's, rebuilt from it when loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specserve.engine.model import LlamaModel
from specserve.errors import DraftCheckpointError
from specserve.learned.checkpoint import load_checkpoint, target_fingerprint
from specserve.learned.eagle_head import register_target_tables, target_tables


@dataclass(frozen=True)
class MedusaConfig:
    hidden_size: int
    num_heads: int  # K: head k guesses the token k past the root
    vocab_size: int  # the target's
    draft_vocab_size: int  # rows of the draft LM head (<= vocab_size)

    def __post_init__(self) -> None:
        assert self.num_heads >= 1 and 0 < self.draft_vocab_size <= self.vocab_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class MedusaHeads(nn.Module):
    """K residual blocks over one hidden row, sharing the target's (frozen) draft-vocabulary LM-head rows."""

    def __init__(self, config: MedusaConfig, lm_head_weight: torch.Tensor, token_map: torch.Tensor) -> None:
        super().__init__()
        assert token_map.shape == (config.draft_vocab_size,) and token_map.dtype == torch.int64
        self.config = config
        shape = (config.num_heads, config.hidden_size, config.hidden_size)
        self.weight = nn.Parameter(torch.zeros(shape))  # [K, out, in]
        self.bias = nn.Parameter(torch.zeros(config.num_heads, config.hidden_size))  # [K, hidden]
        register_target_tables(self, token_map, lm_head_weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every head's feature `# [rows, K, hidden]` from hidden rows `# [rows, hidden]`."""
        return head_features(hidden, self.weight, self.bias)

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary `# [..., draft_vocab]` (draft id d is target token token_map[d])."""
        return features @ self.lm_head_rows.T


def head_features(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h + SiLU(W_k h + b_k) for every head k: `# [rows, K, hidden]` from `# [rows, hidden]`, W `# [K, out, in]`,
    b `# [K, hidden]` (the trained module's, or the drafter's bfloat16 copies)."""
    return hidden[:, None] + F.silu(torch.einsum("rh,koh->rko", hidden, weight) + bias)


def new_medusa_heads(target: LlamaModel, token_map: torch.Tensor, num_heads: int) -> MedusaHeads:
    """Fresh heads (each the target's own LM head until trained) over the draft vocabulary `token_map`."""
    config = MedusaConfig(target.config.hidden_size, num_heads, target.config.vocab_size, len(token_map))
    return MedusaHeads(config, target_tables(target)[1], token_map)


def load_medusa_heads(path: str | Path, target: LlamaModel) -> MedusaHeads:
    """The heads stored at `path`, checked against `target` (DraftCheckpointError when they do not fit)."""
    checkpoint = load_checkpoint(path, "medusa", target_fingerprint(target))
    try:
        config = MedusaConfig(**checkpoint.config)
        heads = MedusaHeads(config, target_tables(target)[1], checkpoint.tensors["token_map"])
        heads.load_state_dict(checkpoint.tensors)
    except (TypeError, KeyError, RuntimeError, AssertionError) as e:
        raise DraftCheckpointError(f"draft checkpoint {path} does not fit its own config ({e})") from e
    return heads.eval()
