"""Early-exit drafter on the real model: its chain is greedy decoding of the target's first L layers +
final norm + LM head (checked against transformers), rollback and batching change nothing, blocks come
back, a full cache drops a draft instead of failing, and a bad exit layer is a clear error."""

from __future__ import annotations

import pytest
import torch

from specserve.drafters import build_drafter
from specserve.drafters.base import DraftRequest
from specserve.drafters.early_exit import EarlyExitConfig, EarlyExitDrafter
from specserve.engine.config import CacheConfig, SpecConfig
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.errors import InvalidRequestError

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def histories(tokenizer) -> list[list[int]]:
    return [tokenizer.render_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]


def make_drafter(model, exit_layer: int = 12, num_blocks: int = 64, **kwargs) -> EarlyExitDrafter:
    # min_confidence 0: chains run to the budget, so their length is known.
    config = EarlyExitConfig(exit_layer=exit_layer, min_confidence=kwargs.pop("min_confidence", 0.0),
                             cache=CacheConfig(block_size=16, num_blocks=num_blocks), **kwargs)
    return EarlyExitDrafter(model, config)


def propose(drafter: EarlyExitDrafter, token_ids: list[int], budget: int, seq_id: int = 0) -> DraftTree:
    return drafter.propose([DraftRequest(seq_id, token_ids, num_prompt_tokens=len(token_ids), budget=budget)])[0]


@torch.no_grad()
def hf_early_exit_greedy(hf_model, token_ids: list[int], exit_layer: int, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding of transformers' model cut after `exit_layer` layers: tokens and their probabilities."""
    ids, probs = list(token_ids), []
    for _ in range(steps):
        hidden = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[exit_layer][0, -1]
        dist = hf_model.lm_head(hf_model.model.norm(hidden)).softmax(dim=-1)
        ids.append(int(dist.argmax()))
        probs.append(float(dist.max()))
    return ids[len(token_ids):], probs


@pytest.mark.parametrize("exit_layer", [1, 12, 28])
def test_first_draft_is_the_argmax_of_the_first_layers(llama_model, hf_model, histories, exit_layer):
    drafter = make_drafter(llama_model, exit_layer)
    for seq_id, history in enumerate(histories):
        tree = propose(drafter, history, budget=1, seq_id=seq_id)
        want, want_probs = hf_early_exit_greedy(hf_model, history, exit_layer, steps=1)
        assert tree.tokens == want and tree.parents == [ROOT]
        assert tree.draft_probs == pytest.approx(want_probs, rel=1e-4)


def test_chain_is_greedy_decoding_of_the_shallow_model(llama_model, hf_model, histories):
    tree = propose(make_drafter(llama_model, exit_layer=20), histories[0], budget=5)
    want, want_probs = hf_early_exit_greedy(hf_model, histories[0], exit_layer=20, steps=5)
    assert tree.tokens == want and tree.parents == [ROOT, 0, 1, 2, 3]
    assert tree.draft_probs == pytest.approx(want_probs, rel=1e-4)


@pytest.mark.parametrize("budget,max_depth,num_nodes", [(1, 8, 1), (3, 8, 3), (8, 2, 2)])
def test_budget_and_max_depth_bound_the_chain(llama_model, histories, budget, max_depth, num_nodes):
    assert propose(make_drafter(llama_model, max_depth=max_depth), histories[1], budget).num_nodes == num_nodes


def test_min_confidence_ends_the_chain_after_the_first_unsure_token(llama_model, histories):
    drafter = make_drafter(llama_model, exit_layer=28, min_confidence=0.9)
    for seq_id, history in enumerate(histories):
        tree = propose(drafter, history, budget=8, seq_id=seq_id)
        assert all(p >= 0.9 for p in tree.draft_probs[:-1])  # it went on only after sure tokens
        assert tree.num_nodes == 8 or tree.draft_probs[-1] < 0.9  # and stopped at the budget or an unsure one


def test_rollback_after_partial_acceptance_matches_a_fresh_drafter(llama_model, histories):
    drafter = make_drafter(llama_model)
    first = propose(drafter, histories[0], budget=4)
    # The verifier kept the first drafted token and then emitted another token than the second.
    recovered = first.tokens[1] + 1
    history = histories[0] + [first.tokens[0], recovered]
    tokens_run: list[int] = []
    hook = llama_model.embed_tokens.register_forward_hook(lambda m, args, out: tokens_run.append(args[0].numel()))
    try:
        again = propose(drafter, history, budget=4)
    finally:
        hook.remove()
    fresh = propose(make_drafter(llama_model), history, budget=4)
    assert again.tokens == fresh.tokens
    assert again.draft_probs == pytest.approx(fresh.draft_probs, rel=1e-4)
    # The accepted token's K/V was kept from drafting: the catch-up ran the recovered root alone.
    assert tokens_run == [1, 1, 1, 1]


def test_a_batch_drafts_what_each_sequence_drafts_alone(llama_model, histories):
    budgets = [4, 1, 3]
    requests = [DraftRequest(i, h, len(h), b) for i, (h, b) in enumerate(zip(histories, budgets))]
    batched = make_drafter(llama_model).propose(requests)
    for history, budget, tree in zip(histories, budgets, batched):
        alone = propose(make_drafter(llama_model), history, budget)
        assert tree.tokens == alone.tokens
        assert tree.draft_probs == pytest.approx(alone.draft_probs, rel=1e-4)


def test_release_frees_blocks_and_state_is_rebuilt(llama_model, histories):
    drafter = make_drafter(llama_model)
    trees = [propose(drafter, history, budget=4, seq_id=i) for i, history in enumerate(histories)]
    assert len(drafter.free_blocks) < 64
    for seq_id in range(len(histories)):
        drafter.release(seq_id)
    drafter.release(99)  # unknown ids are ignored
    assert sorted(drafter.free_blocks) == list(range(64)) and not drafter.states
    assert propose(drafter, histories[0], budget=4).tokens == trees[0].tokens


def test_out_of_cache_gives_an_empty_tree(llama_model, histories):
    history = histories[0]
    blocks_each = -(-(len(history) + 3) // 16)  # the history plus 3 drafted tokens fed back
    drafter = make_drafter(llama_model, num_blocks=blocks_each + 1)
    requests = [DraftRequest(seq_id, history, len(history), budget=4) for seq_id in (0, 1)]
    first, second = drafter.propose(requests)
    assert first.num_nodes == 4 and second.num_nodes == 0  # the second did not fit: no draft, no crash
    assert set(drafter.states) == {0} and len(drafter.free_blocks) == 1
    drafter.release(0)
    assert drafter.propose(requests[1:])[0].tokens == first.tokens


@pytest.mark.parametrize("exit_layer", [0, -3, 30, 31])
def test_bad_exit_layer_is_a_clear_error(llama_model, tokenizer, exit_layer):
    with pytest.raises(InvalidRequestError, match="exit_layer must be"):
        build_drafter(SpecConfig(method="early-exit", exit_layer=exit_layer), llama_model, tokenizer)


def test_build_drafter_shares_the_targets_weights(llama_model, tokenizer):
    drafter = build_drafter(SpecConfig(method="early-exit", exit_layer=5), llama_model, tokenizer)
    # It runs the target model itself, over caches for the first 5 layers only.
    assert isinstance(drafter, EarlyExitDrafter) and drafter.model is llama_model and len(drafter.kv_cache) == 5
