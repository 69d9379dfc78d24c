"""Log probabilities of generated tokens, as OpenAI's `logprobs` / `top_logprobs` and vLLM return them.

A token's log probability is read from the target's raw logits of the row that produced it: a log-softmax
over the whole vocabulary, before temperature, top-k, top-p and min-p (vLLM's default "raw" mode; OpenAI's
do not move with temperature either). A token a speculative step accepted is read from its parent's row of
the verified tree, the row plain decoding would have computed for it, so the values do not depend on
whether the request speculated (up to the float rounding that batch shapes cause). Plain Python (the
client SDK returns these too); engine/sampler.py computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """One generated token's log probability and the most likely tokens of its row."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log probability), most likely first
