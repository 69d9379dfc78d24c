"""Trained early-exit head (LITE, Varshney et al. 2024, on a frozen target): a draft-vocabulary LM head
trained to read the target's residual stream after layer L.

    t_0 .. t_n -> the target's own first L layers (shared, frozen) -> the target's final norm
               -> proj (trained; starts as the target's LM-head rows of the draft vocabulary) -> q of t_{n+1}

LITE fine-tunes the model itself so its intermediate layers predict well through the shared LM head; the
target here must stay exact, so only a head on top of layer L is trained: it learns to read a residual
stream that is not yet the final one. Drafting runs the target's first L layers over the drafter's own
paged K/V (as the untrained early exit does, drafters/early_exit.py) and this head instead of the full LM
head. The checkpoint holds `proj` and `token_map`; the layers, norm and embedding are the target's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from specserve.engine.config import check_exit_layer
from specserve.engine.model import LlamaModel
from specserve.errors import DraftCheckpointError
from specserve.learned.checkpoint import load_checkpoint, target_fingerprint
from specserve.learned.eagle_head import target_tables


@dataclass(frozen=True)
class ExitHeadConfig:
    exit_layer: int  # L: the head reads the target's residual stream after this many layers
    hidden_size: int
    vocab_size: int  # the target's
    draft_vocab_size: int  # rows of the head (<= vocab_size)

    def __post_init__(self) -> None:
        assert self.exit_layer >= 1 and 0 < self.draft_vocab_size <= self.vocab_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ExitHead(nn.Module):
    def __init__(self, config: ExitHeadConfig, token_map: torch.Tensor) -> None:
        super().__init__()
        assert token_map.shape == (config.draft_vocab_size,) and token_map.dtype == torch.int64
        self.config = config
        self.proj = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("token_map", token_map.clone())  # [draft_vocab] target token id of each draft id

    def draft_logits(self, exit_hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary `# [..., draft_vocab]` from the final norm of layer L's output."""
        return self.proj(exit_hidden)


def new_exit_head(target: LlamaModel, token_map: torch.Tensor, exit_layer: int) -> ExitHead:
    """A head after layer `exit_layer` that starts as the untrained early exit (the target's LM-head rows)."""
    check_exit_layer(exit_layer, target.config.num_layers)
    config = ExitHeadConfig(exit_layer, target.config.hidden_size, target.config.vocab_size, len(token_map))
    head = ExitHead(config, token_map)
    with torch.no_grad():
        head.proj.weight.copy_(target_tables(target)[1][token_map])
    return head


def load_exit_head(path: str | Path, target: LlamaModel) -> ExitHead:
    """The head stored at `path`, checked against `target` (DraftCheckpointError when it does not fit)."""
    checkpoint = load_checkpoint(path, "exit-head", target_fingerprint(target))
    try:
        head = ExitHead(ExitHeadConfig(**checkpoint.config), checkpoint.tensors["token_map"])
        head.load_state_dict(checkpoint.tensors)
    except (TypeError, KeyError, RuntimeError, AssertionError) as e:
        raise DraftCheckpointError(f"draft checkpoint {path} does not fit its own config ({e})") from e
    check_exit_layer(head.config.exit_layer, target.config.num_layers)
    return head.eval()


def exit_model(head: ExitHead, target: LlamaModel) -> LlamaModel:
    """The target cut after layer L with `head` as its LM head: an engine `LlamaModel` sharing the target's
    embedding, first L layers, final norm and RoPE tables (no copies), whose logits are over the draft
    vocabulary."""
    config = replace(target.config, num_layers=head.config.exit_layer, tie_word_embeddings=False)
    with torch.device("meta"):  # every module is replaced below: allocate nothing
        model = LlamaModel(config)
    model.embed_tokens, model.rotary, model.norm = target.embed_tokens, target.rotary, target.norm
    model.layers = nn.ModuleList(target.layers[: head.config.exit_layer])
    model.lm_head = head.proj
    return model.eval()
