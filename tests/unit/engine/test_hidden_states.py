"""The engine's hidden-state cache (for feature drafters): what a drafter is handed for a history equals
the target's final-norm hidden states from one fresh forward over that history, through prefill chunks,
verify steps with rejected and moved nodes, and prefix blocks shared between sequences."""

from __future__ import annotations

import torch

from specserve.drafters.base import DraftRequest
from specserve.drafters.ngram import NgramDrafter
from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, SpecConfig
from specserve.engine.draft_tree import DraftTree
from specserve.engine.llm_engine import LLMEngine
from specserve.learned.distill_data import final_hidden_states

BLOCK_SIZE = 16


class RecordingDrafter:
    """The n-gram drafter, recording every (history, hidden states) it is handed."""

    name = "recording"
    needs_hidden = True

    def __init__(self) -> None:
        self.ngram = NgramDrafter()
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        for r in requests:
            assert r.hidden_states is not None and r.hidden_states.shape[0] == len(r.token_ids) - 1
            self.seen.append((list(r.token_ids), r.hidden_states.clone()))
        return self.ngram.propose(requests)

    def release(self, seq_id: int) -> None:
        self.ngram.release(seq_id)


def test_drafter_sees_the_targets_hidden_states(llama_model, tokenizer):
    shared = tokenizer.render_prompt_ids([{"role": "user", "content": "Repeat after me: one two three, one two three."}])
    prompts = [shared, shared[:-3] + shared[-5:]]  # the second shares the first's full prefix blocks
    drafter = RecordingDrafter()
    config = EngineConfig(model_path="unused", cache=CacheConfig(BLOCK_SIZE, 64), spec=SpecConfig(method="ngram"),
                          scheduler=SchedulerConfig(max_num_batched_tokens=24))  # several prefill chunks
    engine = LLMEngine(config, llama_model, tokenizer, drafter=drafter)
    engine.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    assert engine.spec_stats.accepted > 0  # verify steps moved accepted nodes into place
    assert len(drafter.seen) > 10
    for token_ids, hidden in drafter.seen:
        want = final_hidden_states(llama_model, token_ids)[:-1]
        torch.testing.assert_close(hidden, want, atol=2e-4, rtol=1e-4)
