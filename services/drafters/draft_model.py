"""Drafting with the distilled draft model (learned/draft_model.py): greedy chains of a few trained decoder
layers over the target's embedding, ending in the draft-vocabulary LM head, with their own paged K/V
(the chain machinery is drafters/layer_chain.py's). It needs tokens only, no target hidden state.

The layers and the draft LM head run as bfloat16 linears (`decode_linear`) where a kernel has them (float32
otherwise): each draft forward reads every draft weight for a few rows, memory-bound, and drafts are only
proposals the target verifies, so their precision never changes the output.

Chain settings (TRAINED_CHAIN in drafters/layer_chain.py), measured with the default checkpoint (train-draft
--kind draft-model --prompts 800: held-out step-1 / step-2 accuracy 31% / 47%) on 8 training-set prompts it
never saw, 128 greedy tokens, batch 1, budget 8, float32 target on 2 cores; tok/s vs plain decoding (32.7 tok/s):
    min_confidence   max_depth 4          max_depth 8
    0.2              1.20x (tau 1.42)     1.17x (tau 1.44)
    0.4              1.24x (tau 1.38)     1.13x (tau 1.39)
    0.6              1.10x (tau 1.36)     1.14x (tau 1.37)
    0.8              1.09x (tau 1.33)     0.95x (tau 1.33)
(n-gram on the same prompts: 1.78x, tau 1.73.) Runs differ: 0.4 / 4 gave 1.08x in another run.
"""

from __future__ import annotations

import torch
from torch import nn

from specserve.drafters.layer_chain import TRAINED_CHAIN, ChainConfig, LayerChainDrafter
from specserve.engine.quant import decode_linear, has_bfloat16_linear, swap_modules
from specserve.learned.draft_model import DraftModel, serving_model


class DraftModelDrafter(LayerChainDrafter):
    name = "draft-model"

    def __init__(self, draft: DraftModel, config: ChainConfig = TRAINED_CHAIN) -> None:
        model = serving_model(draft)
        if has_bfloat16_linear():
            swap_modules(model, nn.Linear, lambda m: decode_linear(m.weight, None, torch.bfloat16))
        super().__init__(model, model.config.num_layers, config, token_map=draft.token_map)
