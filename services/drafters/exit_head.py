"""Drafting with a trained early-exit head (learned/exit_head.py): greedy chains of the target's own first L
layers (its weights, no copy; the drafter's own paged K/V) read through the trained draft-vocabulary head
instead of the full LM head (the chain machinery is drafters/layer_chain.py's).

The head runs as a bfloat16 linear (`decode_linear`) where a kernel has it (float32 otherwise): it is read in full
for a few rows each draft forward, and drafts are only proposals the target verifies.

Measured with the default checkpoint (train-draft --kind exit-head --prompts 800, L 4: held-out accuracy 35%)
on 8 training-set prompts it never saw, 128 greedy tokens, batch 1, budget 8, float32 target on 2 cores:
1.15x plain decoding at min_confidence 0.9 / max_depth 8 (tau 1.41) and at 0.4 / 4 (tau 1.51), 1.11x at
0.2 / 4 (tau 1.55); the draft model 1.08x (tau 1.38) and n-gram 1.72x (tau 1.81) in the same run. n-gram
first with this drafter where n-gram has nothing: 1.69x (tau 2.18); merged with n-gram: no better.
"""

from __future__ import annotations

import torch

from specserve.drafters.layer_chain import TRAINED_CHAIN, ChainConfig, LayerChainDrafter
from specserve.engine.model import LlamaModel
from specserve.engine.quant import decode_linear, has_bfloat16_linear
from specserve.learned.exit_head import ExitHead, exit_model


class ExitHeadDrafter(LayerChainDrafter):
    name = "exit-head"

    def __init__(self, head: ExitHead, target: LlamaModel, config: ChainConfig = TRAINED_CHAIN,
                 pack: bool = True) -> None:
        model = exit_model(head, target)
        if pack and has_bfloat16_linear():  # pack=False: the head's float32 nn.Linear as trained
            model.lm_head = decode_linear(head.proj.weight, None, torch.bfloat16)
        super().__init__(model, head.config.exit_layer, config, token_map=head.token_map)
