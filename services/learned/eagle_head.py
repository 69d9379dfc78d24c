"""The EAGLE draft head (Li et al. 2024, EAGLE / EAGLE-2): one decoder layer that predicts the target's
next final-norm hidden state ("feature") from the current one and the next token's embedding.

Position i of a sequence t_0 .. t_n is the pair (h_{i-1}, t_i): h_{i-1} is the target's final-norm
hidden state at token i-1 (the one whose LM-head output predicted t_i), t_i that token. The head maps
    x_i = fc([h_{i-1} ; embed(t_i)])        -> one Llama decoder layer over x_1 .. x_i (causal)
        -> f_i ~ h_i                         -> draft logits = lm_head_rows(f_i)   (q of t_{i+1})
Drafting feeds its own f_i back as the next pair's feature; training uses the target's h (teacher
forcing) and regresses f_i on h_i. The embedding and LM head are the target's, frozen and not stored:
only `fc`, the layer and `token_map` (the draft vocabulary, EAGLE-3 style: the most frequent target
tokens; a token outside it is never drafted) are the checkpoint (learned/checkpoint.py).
The layer reuses the target's module classes (engine/model.py) with contiguous K/V per sequence instead
of the paged cache: its K/V are rebuilt from verified hidden states, never shared with the target's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specserve.engine.config import ModelConfig
from specserve.engine.model import MLP, LlamaModel, RMSNorm, Rotary, apply_rope
from specserve.errors import DraftCheckpointError
from specserve.learned.checkpoint import load_checkpoint, target_fingerprint

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [batch, num_kv_heads, num_keys, head_dim]


@dataclass(frozen=True)
class EagleConfig:
    """The head's shape: the target's layer geometry and the size of the draft vocabulary."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # the target's
    draft_vocab_size: int  # rows of the draft LM head (<= vocab_size)

    def __post_init__(self) -> None:
        assert 0 < self.draft_vocab_size <= self.vocab_size

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab_size: int) -> EagleConfig:
        return cls(target.hidden_size, target.intermediate_size, target.num_heads, target.num_kv_heads,
                   target.head_dim, target.rms_norm_eps, target.rope_theta, target.max_position_embeddings,
                   target.vocab_size, min(draft_vocab_size, target.vocab_size))

    def as_model_config(self) -> ModelConfig:
        """A one-layer ModelConfig, for reusing the target's module classes."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                           rope_theta=self.rope_theta)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class HeadAttention(nn.Module):
    """GQA self-attention over contiguous K/V: earlier keys `past` plus this call's, with a mask."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [batch, num_new, hidden]
        rope: torch.Tensor,  # [batch, num_new, 1, head_dim / 2] complex64
        past: KV | None,  # each [batch, num_kv_heads, num_past, head_dim]
        mask: torch.Tensor | None,  # [batch, 1, num_new, num_past + num_new] bool (True = may attend); None = causal
    ) -> tuple[torch.Tensor, KV]:  # [batch, num_new, hidden], this call's (k, v) [batch, Hkv, num_new, D]
        batch, num_new, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, num_new, -1, self.head_dim)
        qk = apply_rope(qkv[:, :, : self.num_heads + self.num_kv_heads].flatten(0, 1), rope.flatten(0, 1))
        qk = qk.view(batch, num_new, -1, self.head_dim)
        q = qk[:, :, : self.num_heads].transpose(1, 2)  # [B, H, N, D]
        k = qk[:, :, self.num_heads :].transpose(1, 2)  # [B, Hkv, N, D]
        v = qkv[:, :, self.num_heads + self.num_kv_heads :].transpose(1, 2)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        causal = mask is None and past is None
        assert mask is not None or past is None or num_new == 1, "with past keys, several new rows need a mask"
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and num_new > 1,
                                             enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_new, -1)), (k, v)


class EagleHead(nn.Module):
    """fc + one decoder layer + the target's (frozen) embedding and draft-vocabulary LM head rows."""

    def __init__(self, config: EagleConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 token_map: torch.Tensor) -> None:
        super().__init__()
        assert token_map.shape == (config.draft_vocab_size,) and token_map.dtype == torch.int64
        self.config = config
        layer_config = config.as_model_config()
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = HeadAttention(layer_config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(layer_config)
        self.rotary = Rotary(layer_config)
        register_target_tables(self, token_map, lm_head_weight, embed_weight)

    def forward(
        self,
        prev_hidden: torch.Tensor,  # [batch, num_new, hidden] h_{i-1}: target features, or the head's own
        token_ids: torch.Tensor,  # [batch, num_new] int64 t_i
        positions: torch.Tensor,  # [batch, num_new] int64 i
        past: KV | None = None,  # earlier pairs' K/V, each [batch, num_kv_heads, num_past, head_dim]
        mask: torch.Tensor | None = None,  # [batch, 1, num_new, num_past + num_new] bool; None = causal
    ) -> tuple[torch.Tensor, KV]:
        """Predicted features f_i `# [batch, num_new, hidden]` and this call's K/V (to extend `past`)."""
        x = self.fc(torch.cat([prev_hidden, F.embedding(token_ids, self.embed_weight)], dim=-1))
        rope = self.rotary.tables(positions.reshape(-1)).view(*positions.shape, 1, -1)
        attn_out, kv = self.self_attn(self.input_layernorm(x), rope, past, mask)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary `# [..., draft_vocab]` (draft id d is target token token_map[d])."""
        return features @ self.lm_head_rows.T


def register_target_tables(module: nn.Module, token_map: torch.Tensor, lm_head_weight: torch.Tensor,
                           embed_weight: torch.Tensor | None = None) -> None:
    """Give a drafter module its draft vocabulary and the frozen target tensors it reads:
    `token_map` `# [draft_vocab]` (the target token id of each draft id; in the checkpoint), `lm_head_rows`
    `# [draft_vocab, hidden]` and, if given, `embed_weight` `# [vocab, hidden]` (both float32 and
    non-persistent: `state_dict()`, the checkpoint, leaves them out; they are rebuilt from the target)."""
    module.register_buffer("token_map", token_map.clone())
    module.register_buffer("lm_head_rows", lm_head_weight.detach().float()[token_map].contiguous(), persistent=False)
    if embed_weight is not None:
        module.register_buffer("embed_weight", embed_weight.detach().float(), persistent=False)


def target_tables(target: LlamaModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's embedding and LM-head weights `# [vocab, hidden]` (float32 copies where needed).

    A packed or int8 LM head keeps no float weight, so an untied target must still have an nn.Linear head.
    """
    embed = target.embed_tokens.weight.detach().float()
    if target.config.tie_word_embeddings:
        return embed, embed
    weight = getattr(target.lm_head, "weight", None)
    if weight is None:
        raise DraftCheckpointError("a learned drafter needs the target's LM-head weight; load the target in float32")
    return embed, weight.detach().float()


def new_eagle_head(target: LlamaModel, token_map: torch.Tensor) -> EagleHead:
    """A fresh head for `target` over the draft vocabulary `token_map` `# [draft_vocab]` (target ids)."""
    return EagleHead(EagleConfig.for_target(target.config, len(token_map)), *target_tables(target), token_map)


def load_eagle_head(path: str | Path, target: LlamaModel) -> EagleHead:
    """The head stored at `path`, checked against `target` (DraftCheckpointError when it does not fit)."""
    checkpoint = load_checkpoint(path, "eagle", target_fingerprint(target))
    try:
        config = EagleConfig(**checkpoint.config)
        head = EagleHead(config, *target_tables(target), checkpoint.tensors["token_map"])
        head.load_state_dict(checkpoint.tensors)
    except (TypeError, KeyError, RuntimeError, AssertionError) as e:
        raise DraftCheckpointError(f"draft checkpoint {path} does not fit its own config ({e})") from e
    return head.eval()
