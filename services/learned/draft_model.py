"""The distilled draft model: a shallow Llama (a few decoder layers copied from the target, then trained)
that drafts autoregressively from tokens alone, like any small draft model, but shares the target's
embedding table and drafts over a reduced vocabulary (the target's LM-head rows of the most frequent
tokens, as EAGLE-3 and learned/eagle_head.py do).

    t_0 .. t_n -> embed (the target's, frozen) -> L decoder layers (trained) -> norm (trained)
               -> lm_head_rows (the target's rows of the draft vocabulary, frozen) -> q of t_{n+1}

Layer l starts as the target's layer `source_layers[l]` (DistilBERT-style initialisation from the teacher):
a copy of layers that already turn embeddings into a residual stream the final norm and LM head can read.
Unlike the EAGLE head it needs no target hidden state, so it drafts from any token history (a drafter
service sees tokens only) and keeps its own K/V; unlike the untrained early exit (drafters/early_exit.py)
its layers are trained to predict the target's next token from L layers, not to be the target's first L.

Two forms of one set of weights: `DraftModel` trains over padded batches with contiguous causal attention
(learned/train_draft_model.py); `serving_model` turns it into an engine `LlamaModel` of L layers whose
LM head is the draft-vocabulary rows, which drafts over its own paged K/V (drafters/draft_model.py). The
checkpoint holds the layers, the norm and `token_map`; the embedding and LM-head rows are the target's,
rebuilt from it when loaded (learned/checkpoint.py refuses another target).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.engine.config import ModelConfig
from specserve.engine.model import MLP, LlamaModel, RMSNorm, Rotary
from specserve.errors import DraftCheckpointError, InvalidRequestError
from specserve.learned.checkpoint import load_checkpoint, target_fingerprint
from specserve.learned.eagle_head import KV, HeadAttention, register_target_tables, target_tables


@dataclass(frozen=True)
class DraftModelConfig:
    source_layers: tuple[int, ...]  # the target layer each draft layer starts from, in order
    vocab_size: int  # the target's
    draft_vocab_size: int  # rows of the draft LM head (<= vocab_size)
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        assert self.source_layers and 0 < self.draft_vocab_size <= self.vocab_size

    @classmethod
    def for_target(cls, target: ModelConfig, source_layers: tuple[int, ...], draft_vocab_size: int) -> DraftModelConfig:
        if not source_layers or not all(0 <= i < target.num_layers for i in source_layers):
            raise InvalidRequestError(f"draft layers must be target layers 0 .. {target.num_layers - 1}, "
                                      f"got {list(source_layers)}")
        return cls(tuple(source_layers), target.vocab_size, min(draft_vocab_size, target.vocab_size),
                   target.hidden_size, target.intermediate_size, target.num_heads, target.num_kv_heads,
                   target.head_dim, target.rms_norm_eps, target.rope_theta, target.max_position_embeddings,
                   target.rope_scaling)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> DraftModelConfig:
        """Inverse of `to_dict` (JSON turns tuples into lists)."""
        scaling = tuple((str(k), v) for k, v in fields.get("rope_scaling", ()))
        return cls(**{**fields, "source_layers": tuple(fields["source_layers"]), "rope_scaling": scaling})

    def as_model_config(self) -> ModelConfig:
        """The serving `LlamaModel`'s config: L layers, the full vocabulary in (embedding), the draft one out."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=len(self.source_layers),
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                           rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainLayer(nn.Module):
    """One Llama decoder layer over contiguous batches (causal SDPA); its parameter names are the engine's
    `DecoderLayer`'s, so its state dict loads into the serving model as is."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = HeadAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # [batch, n, hidden] -> same
        return self.extend(x, rope, None)[0]

    def extend(self, x: torch.Tensor, rope: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """`forward` of new rows after the cached keys and values `past` (one new row when there are any):
        the rows, and every key and value so far."""
        out, (k, v) = self.self_attn(self.input_layernorm(x), rope, past, None)
        x = x + out
        kv = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class DraftModel(nn.Module):
    """The trainable form: L layers and a norm over the target's frozen embedding and draft LM-head rows."""

    def __init__(self, config: DraftModelConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 token_map: torch.Tensor) -> None:
        super().__init__()
        assert token_map.shape == (config.draft_vocab_size,) and token_map.dtype == torch.int64
        self.config = config
        model_config = config.as_model_config()
        self.layers = nn.ModuleList(TrainLayer(model_config) for _ in config.source_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(model_config)
        register_target_tables(self, token_map, lm_head_weight, embed_weight)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm features `# [batch, n, hidden]` of token rows `# [batch, n]` at positions 0 .. n-1
        (causal: a row never sees the padding after it)."""
        batch, n = token_ids.shape
        rope = self.rotary.tables(torch.arange(n, device=token_ids.device).repeat(batch))
        rope = rope.view(batch, n, 1, -1)
        x = F.embedding(token_ids, self.embed_weight)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary `# [..., draft_vocab]` (draft id d is target token token_map[d])."""
        return features @ self.lm_head_rows.T

    @torch.no_grad()
    def sample(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...],
               generator: torch.Generator) -> list[int]:
        """A response the draft model writes itself: each token drawn from its own q at temperature 1 and fed
        back (keys and values cached), up to `max_new_tokens` or a stop id (kept). Target token ids."""
        past: list[KV | None] = [None] * len(self.layers)
        ids, start, response = torch.tensor([prompt]), 0, []
        for _ in range(max_new_tokens):
            n = ids.shape[1]
            rope = self.rotary.tables(torch.arange(start, start + n)).view(1, n, 1, -1)
            x = F.embedding(ids, self.embed_weight)
            for i, layer in enumerate(self.layers):
                x, past[i] = layer.extend(x, rope, past[i])
            probs = torch.softmax(self.draft_logits(self.norm(x[0, -1])), dim=-1)
            token = int(self.token_map[torch.multinomial(probs, 1, generator=generator)])
            response.append(token)
            if token in stop_ids:
                break
            ids, start = torch.tensor([[token]]), start + n
        return response


def new_draft_model(target: LlamaModel, token_map: torch.Tensor, source_layers: tuple[int, ...]) -> DraftModel:
    """A draft model whose layers and norm start as copies of the target's `source_layers` and final norm."""
    config = DraftModelConfig.for_target(target.config, source_layers, len(token_map))
    model = DraftModel(config, *target_tables(target), token_map)
    for layer, source in zip(model.layers, source_layers):
        # The target's attention is the paged one; its qkv_proj / o_proj names are HeadAttention's.
        layer.load_state_dict(_float_state(target.layers[source]))
    model.norm.load_state_dict(_float_state(target.norm))
    return model


def _float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    if any(not t.is_floating_point() for t in state.values()):
        raise DraftCheckpointError("a draft model starts from the target's float weights; load it in float32")
    return {name: t.detach().float().clone() for name, t in state.items()}


def load_draft_model(path: str | Path, target: LlamaModel) -> DraftModel:
    """The draft model stored at `path`, checked against `target` (DraftCheckpointError when it does not fit)."""
    checkpoint = load_checkpoint(path, "draft-model", target_fingerprint(target))
    try:
        config = DraftModelConfig.from_dict(checkpoint.config)
        model = DraftModel(config, *target_tables(target), checkpoint.tensors["token_map"])
        model.load_state_dict(checkpoint.tensors)
    except (TypeError, KeyError, RuntimeError, AssertionError) as e:
        raise DraftCheckpointError(f"draft checkpoint {path} does not fit its own config ({e})") from e
    return model.eval()


def serving_model(draft: DraftModel) -> LlamaModel:
    """The engine form of `draft` (float32 `nn.Linear`s; the caller packs them): an L-layer `LlamaModel`
    whose logits are over the draft vocabulary. Its embedding shares the target's table (no copy)."""
    config = replace(draft.config.as_model_config(), tie_word_embeddings=False)
    model = LlamaModel(config)
    model.lm_head = nn.Linear(config.hidden_size, draft.config.draft_vocab_size, bias=False)
    state = {name: t for name, t in draft.state_dict().items() if name != "token_map"}
    state |= {"embed_tokens.weight": draft.embed_weight, "lm_head.weight": draft.lm_head_rows}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(name.startswith("rotary.") for name in missing), (missing, unexpected)
    return model.eval().requires_grad_(False)
