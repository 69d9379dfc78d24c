"""The verifier's step on the real model: prefill chunks, plain decodes and draft trees of several
sequences in one forward give the engine's greedy tokens; lost or mismatched sequences answer
UNKNOWN_SEQUENCE; a full cache answers NO_CAPACITY without touching anyone else; bad items are refused
before any state changes."""

from __future__ import annotations

import pytest
import torch

from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams
from specserve.engine.draft_tree import DraftTree
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import InvalidRequestError
from specserve.verifier.core import ItemStatus, VerifierCore, VerifyWork

GREEDY = SamplingParams(max_tokens=64)
PROMPTS = ["Name three rivers in Europe.", "What is 17 times 3? Explain briefly."]


@pytest.fixture(scope="module")
def reference(llama_model, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and the engine's greedy continuations (24 tokens, EOS ignored)."""
    engine = LLMEngine(EngineConfig(model_path="unused", cache=CacheConfig(num_blocks=64)), llama_model, tokenizer)
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    return prompts, [c.token_ids for c in engine.generate(prompts, params)]


def new_core(llama_model, num_blocks: int = 64, keep_hidden: bool = False) -> VerifierCore:
    return VerifierCore(llama_model, CacheConfig(num_blocks=num_blocks, block_size=16), keep_hidden=keep_hidden)


def test_chunks_decodes_and_trees_in_one_forward_match_the_engine(llama_model, reference) -> None:
    prompts, expected = reference
    core = new_core(llama_model)
    outputs: list[list[int]] = [[], []]
    held = [0, 0]  # tokens each sequence has on the verifier
    # Sequence 0 prefills in chunks of 7 tokens; sequence 1 in one go.
    work = [VerifyWork(0, prompts[0], GREEDY, max_compute_tokens=7), VerifyWork(1, prompts[1], GREEDY)]
    step = 0
    while min(map(len, outputs)) < 24:
        for outcome in core.step(work):
            assert outcome.status is ItemStatus.OK
            i = outcome.seq_id
            held[i] += len(next(w for w in work if w.seq_id == i).new_token_ids) + len(outcome.token_ids)
            outputs[i] += outcome.token_ids
        work = []
        for i in range(2):
            if not outputs[i]:
                work.append(VerifyWork(i, [], max_compute_tokens=7 if i == 0 else 0, position=held[i]))
                continue
            # Alternate trees: the true next 3 tokens as a chain (all accepted), or a wrong first guess
            # beside the true one (the tree keeps the right branch).
            truth = expected[i][len(outputs[i]):len(outputs[i]) + 3]
            if not truth:
                tree = None
            elif step % 2 == 0:
                tree = DraftTree.chain(truth)
            else:
                wrong = (truth[0] + 1) % llama_model.config.vocab_size
                tree = DraftTree([wrong, truth[0]], [-1, -1], [1.0, 1.0])
            work.append(VerifyWork(i, [], tree=tree, position=held[i]))
        step += 1
    for i in range(2):
        assert outputs[i][:24] == expected[i]
    core.release([0, 1])
    assert core.occupancy() == (64, 0)


def test_unknown_and_mismatched_sequences(llama_model, reference) -> None:
    prompts, _ = reference
    core = new_core(llama_model)
    (outcome,) = core.step([VerifyWork(5, [], position=10)])
    assert outcome.status is ItemStatus.UNKNOWN_SEQUENCE
    (outcome,) = core.step([VerifyWork(5, prompts[0], GREEDY)])
    assert outcome.status is ItemStatus.OK and len(outcome.token_ids) == 1
    # The router believes the verifier holds one token less than it does: the verifier forgets it.
    (outcome,) = core.step([VerifyWork(5, [], position=len(prompts[0]))])
    assert outcome.status is ItemStatus.UNKNOWN_SEQUENCE
    assert core.occupancy() == (64, 0)


def test_no_capacity_leaves_other_sequences_alone(llama_model, reference) -> None:
    prompts, expected = reference
    core = new_core(llama_model, num_blocks=6)  # 96 slots
    (first,) = core.step([VerifyWork(0, prompts[0], GREEDY)])
    assert first.status is ItemStatus.OK
    free_before = core.occupancy()[0]
    # Reversed, so it shares no prefix block with sequence 0 (both start with the chat template's header).
    long_prompt = list(reversed(prompts[1] * 3))[: 16 * free_before + 1]  # one block more than is free
    (refused,) = core.step([VerifyWork(1, long_prompt, GREEDY)])
    assert refused.status is ItemStatus.NO_CAPACITY
    assert core.occupancy() == (free_before, 1)  # nothing kept for the refused sequence
    # Sequence 0 continues as if nothing happened.
    held = len(prompts[0]) + 1
    tokens = list(first.token_ids)
    for _ in range(3):
        (outcome,) = core.step([VerifyWork(0, [], position=held)])
        tokens += outcome.token_ids
        held += len(outcome.token_ids)
    assert tokens == expected[0][:4]


def test_a_tree_without_free_blocks_is_dropped_not_refused(llama_model, reference) -> None:
    prompts, _ = reference
    core = new_core(llama_model, num_blocks=6)
    a, b = (prompts[0] * 2)[:47], (prompts[1] * 2)[:47]  # 48 tokens each after the first sample: 3 blocks
    core.step([VerifyWork(0, a, GREEDY), VerifyWork(1, b, GREEDY)])
    assert core.occupancy() == (0, 2)
    tree = DraftTree.chain(range(100, 105))  # would need a fourth block
    (outcome,) = core.step([VerifyWork(0, [], tree=tree, position=len(a) + 1)])
    assert outcome.status is ItemStatus.OK and outcome.num_accepted == 0 and len(outcome.token_ids) == 1


def test_hidden_states_follow_the_computed_tokens(llama_model, reference) -> None:
    prompts, _ = reference
    prompt = prompts[0]
    chunked, whole = new_core(llama_model, keep_hidden=True), new_core(llama_model, keep_hidden=True)
    rows = []
    (outcome,) = chunked.step([VerifyWork(0, prompt, GREEDY, max_compute_tokens=10)], return_hidden=True)
    rows.append(outcome.hidden_states)
    while not outcome.token_ids:
        (outcome,) = chunked.step([VerifyWork(0, [], max_compute_tokens=10, position=len(prompt))], return_hidden=True)
        rows.append(outcome.hidden_states)
    (reference_outcome,) = whole.step([VerifyWork(0, prompt, GREEDY)], return_hidden=True)
    chunked_rows = torch.cat(rows)
    assert chunked_rows.shape == (len(prompt), llama_model.config.hidden_size)
    torch.testing.assert_close(chunked_rows, reference_outcome.hidden_states, rtol=1e-4, atol=1e-4)


def test_bad_items_are_refused_before_any_change(llama_model, reference) -> None:
    prompts, _ = reference
    core = new_core(llama_model)
    vocab = llama_model.config.vocab_size
    bad = [
        [VerifyWork(0, [], GREEDY)],  # a first item without tokens
        [VerifyWork(0, prompts[0], None)],  # ... or without sampling
        [VerifyWork(0, [vocab], GREEDY)],  # token out of range
        [VerifyWork(0, prompts[0], GREEDY), VerifyWork(0, prompts[0], GREEDY)],  # twice in one step
        [VerifyWork(0, prompts[0], GREEDY, max_compute_tokens=-1)],
        [VerifyWork(0, [1] * 10_000, GREEDY)],  # longer than the context
    ]
    for work in bad:
        with pytest.raises(InvalidRequestError):
            core.step([VerifyWork(9, prompts[1], GREEDY)] + work)
        assert core.occupancy() == (64, 0), work
