"""Self-speculation by early exit (LITE, Varshney et al. 2024; LayerSkip, Elhoushi et al. 2024): the
target's own first `exit_layer` layers, then its final norm and LM head, draft a greedy chain.

The drafter shares the target's weights (no copy) but keeps its own paged K/V for those layers; the
chain machinery (catch-up, rollback, batching, confidence stop) is drafters/layer_chain.py's.

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
least slow measured (0.8 to 0.95 is a wash): an untrained exit does not pay on this CPU. Its trained
counterpart is the distilled draft model (drafters/draft_model.py: a few layers trained to predict the
target's next token over a reduced vocabulary); a verifier that reuses the drafter's first-L-layer work
instead of recomputing it is a later issue. A draft forward is the target's own `forward` given only the
first L layers' caches.
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.drafters.layer_chain import ChainConfig, LayerChainDrafter
from specserve.engine.config import check_exit_layer
from specserve.engine.model import LlamaModel


# The default exit skips the last 2 layers (28 of SmolLM2's 30): the least slow setting measured above.
EXIT_LAYERS_SKIPPED = 2


@dataclass(frozen=True, kw_only=True)
class EarlyExitConfig(ChainConfig):
    exit_layer: int  # decoder layers the draft runs, 1 .. num_layers - 1 (SpecConfig.exit_layer)


class EarlyExitDrafter(LayerChainDrafter):
    name = "early-exit"

    def __init__(self, model: LlamaModel, config: EarlyExitConfig) -> None:
        check_exit_layer(config.exit_layer, model.config.num_layers)
        super().__init__(model, config.exit_layer, config)
