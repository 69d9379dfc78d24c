"""Drafting with the distilled draft model (learned/draft_model.py): greedy chains of a few trained decoder
layers over the target's embedding, ending in the draft-vocabulary LM head, with their own paged K/V
(the chain machinery is drafters/layer_chain.py's). It needs tokens only, no target hidden state.

The layers and the draft LM head run as bfloat16 prepacked linears where this torch has them (float32
otherwise): each draft forward reads every draft weight for a few rows, memory-bound, and drafts are only
proposals the target verifies, so their precision never changes the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specserve.drafters.layer_chain import ChainConfig, LayerChainDrafter
from specserve.engine.quant import PackedLinear, can_pack, swap_modules
from specserve.learned.draft_model import DraftModel, serving_model


@dataclass(frozen=True, kw_only=True)
class DraftModelChainConfig(ChainConfig):
    min_confidence: float = 0.5  # a trained drafter's confidence ranks better than an untrained exit's


class DraftModelDrafter(LayerChainDrafter):
    name = "draft-model"

    def __init__(self, draft: DraftModel, config: ChainConfig = DraftModelChainConfig()) -> None:
        model = serving_model(draft)
        if can_pack():
            swap_modules(model, nn.Linear, lambda m: PackedLinear(m.weight, None, torch.bfloat16))
        super().__init__(model, model.config.num_layers, config, token_map=draft.token_map)
