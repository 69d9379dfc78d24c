"""Medusa drafter on a tiny random target and heads: its tree is exactly the `budget` best paths of the
heads' Cartesian product, parents first, each node carrying its head's probability; a batch equals one
call per sequence; no state is kept."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from specserve.drafters.base import DraftRequest
from specserve.drafters.medusa import MedusaDraftConfig, MedusaDrafter, best_paths
from specserve.engine.config import ModelConfig
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.model import LlamaModel
from specserve.errors import InvalidRequestError
from specserve.learned.medusa_heads import MedusaHeads, new_medusa_heads

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=128)
_rng = torch.Generator().manual_seed(0)
HISTORY = torch.randint(0, TINY.vocab_size, (12,), generator=_rng).tolist()
HIDDEN = torch.randn(12, TINY.hidden_size, generator=_rng)  # h_i of HISTORY's token i


def tiny_heads(num_heads: int = 3) -> MedusaHeads:
    """Random heads over a 48-token draft vocabulary (a shuffled half of the target's)."""
    torch.manual_seed(0)
    target = LlamaModel(TINY)
    for param in target.parameters():
        nn.init.normal_(param, std=0.5)  # peaked distributions
    heads = new_medusa_heads(target, torch.randperm(TINY.vocab_size)[:48], num_heads)
    for param in heads.parameters():
        nn.init.normal_(param, std=0.2)
    return heads.eval()


def propose(drafter: MedusaDrafter, length: int, budget: int, hidden: torch.Tensor = HIDDEN) -> DraftTree:
    request = DraftRequest(0, HISTORY[:length], num_prompt_tokens=1, budget=budget, hidden_states=hidden[: length - 1])
    return drafter.propose([request])[0]


def brute_force_best(tokens: list[list[int]], probs: list[list[float]], budget: int) -> list[float]:
    """Scores of the `budget` best paths of every length, by listing them all."""
    scores = []
    for depth in range(1, len(tokens) + 1):
        for choice in itertools.product(*(range(len(t)) for t in tokens[:depth])):
            scores.append(math.prod(probs[d][c] for d, c in enumerate(choice)))
    return sorted(scores, reverse=True)[:budget]


def node_scores(tree: DraftTree) -> list[float]:
    return [math.prod(tree.draft_probs[j] for j in tree.path_to(i)) for i in range(tree.num_nodes)]


@pytest.mark.parametrize("seed,budget", [(0, 1), (1, 5), (2, 12), (3, 40), (4, 200)])
def test_best_paths_are_the_budget_best_of_the_product(seed, budget):
    generator = torch.Generator().manual_seed(seed)
    depth, width = 3, 4
    raw = torch.rand(depth, width, generator=generator)
    probs = (raw / raw.sum(1, keepdim=True)).sort(1, descending=True).values.tolist()
    tokens = [list(range(10 * d, 10 * d + width)) for d in range(depth)]
    tree = best_paths(tokens, probs, budget)
    assert tree.num_nodes == min(budget, width + width**2 + width**3)
    assert sorted(node_scores(tree), reverse=True) == pytest.approx(brute_force_best(tokens, probs, budget))
    for node, (token, parent, depth_of) in enumerate(zip(tree.tokens, tree.parents, tree.depths())):
        assert token in tokens[depth_of - 1] and (parent == ROOT) == (depth_of == 1) and parent < node


def test_best_paths_small_example_and_ties():
    tree = best_paths([[7, 8], [9]], [[0.6, 0.3], [0.5]], 3)  # 7 (0.6), then 8 and 7->9 tie at 0.3
    assert (tree.tokens, tree.parents, tree.draft_probs) == ([7, 8, 9], [ROOT, ROOT, 0], [0.6, 0.3, 0.5])
    assert best_paths([[7]], [[1.0]], 0).num_nodes == 0


@torch.inference_mode()
def test_tree_follows_each_heads_distribution():
    heads = tiny_heads()
    drafter = MedusaDrafter(heads, MedusaDraftConfig(top_k=5, dtype="float32"))
    tree = propose(drafter, length=8, budget=10)
    assert tree.num_nodes == 10
    probs = heads.draft_logits(heads(HIDDEN[6:7]))[0].softmax(-1)  # [K, draft_vocab] from h of the root's parent
    depths = tree.depths()
    for node, token in enumerate(tree.tokens):
        head = depths[node] - 1
        draft_id = heads.token_map.tolist().index(token)
        assert tree.draft_probs[node] == pytest.approx(probs[head, draft_id].item(), rel=1e-5)
        assert draft_id in probs[head].topk(5).indices.tolist()
    assert max(depths) >= 2  # the product tree reaches past the first head


def test_bfloat16_drafting_stays_close_to_float32():
    exact = propose(MedusaDrafter(tiny_heads(), MedusaDraftConfig(dtype="float32")), 8, 1)
    fast = propose(MedusaDrafter(tiny_heads()), 8, 1)
    assert fast.tokens == exact.tokens and fast.draft_probs == pytest.approx(exact.draft_probs, rel=0.05)


def test_a_batch_equals_one_call_per_sequence():
    drafter = MedusaDrafter(tiny_heads(), MedusaDraftConfig(dtype="float32"))
    other = torch.randn(12, TINY.hidden_size, generator=torch.Generator().manual_seed(5))
    requests = [DraftRequest(1, HISTORY[:6], 1, 4, HIDDEN[:5]), DraftRequest(2, HISTORY[:1], 1, 4, HIDDEN[:0]),
                DraftRequest(3, HISTORY[:10], 1, 7, other[:9])]
    batch = drafter.propose(requests)
    for request, tree in zip(requests, batch):
        alone = drafter.propose([request])[0]
        assert (tree.tokens, tree.parents) == (alone.tokens, alone.parents)
        assert tree.draft_probs == pytest.approx(alone.draft_probs, rel=1e-5)
    assert batch[1].num_nodes == 0  # a lone root has no hidden state before it
    drafter.release(1)  # stateless: release is a no-op, unknown ids included
    drafter.release(12345)


def test_missing_hidden_states_is_an_engine_bug():
    drafter = MedusaDrafter(tiny_heads())
    with pytest.raises(AssertionError, match="h of every non-root token"):
        drafter.propose([DraftRequest(0, HISTORY[:5], 1, 3, HIDDEN[:2])])


def test_untrained_heads_start_as_the_lm_head():
    torch.manual_seed(0)
    target = LlamaModel(TINY)
    heads = new_medusa_heads(target, torch.arange(TINY.vocab_size), num_heads=2)
    features = heads(HIDDEN[:3])  # zero weights: SiLU(0) = 0, each head's feature is h itself
    assert torch.equal(features, HIDDEN[:3, None].expand(3, 2, -1))


@pytest.mark.parametrize("kwargs", [{"top_k": 0}, {"dtype": "float16"}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(InvalidRequestError):
        MedusaDraftConfig(**kwargs)


def test_sampled_chain_draws_head_d_at_depth_d():
    """At T > 0 each head draws one token from its own q at the request's settings: a chain, with q."""
    from specserve.engine.config import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=5, seed=9)
    heads = tiny_heads(3)
    drafter = MedusaDrafter(heads, MedusaDraftConfig(dtype="float32"))
    request = DraftRequest(0, HISTORY[:6], num_prompt_tokens=1, budget=2, hidden_states=HIDDEN[:5], sampling=params)
    tree = drafter.propose([request])[0]
    assert tree.parents == [ROOT, 0] and sorted(tree.draft_dists) == [0, 1]  # cut to the budget
    probs = heads.draft_logits(heads(HIDDEN[4:5]))[0].softmax(-1)  # [K, draft_vocab] from h of the root's parent
    for depth in range(2):
        top = probs[depth].topk(5)
        want = dict(zip(heads.token_map[top.indices].tolist(), (top.values / top.values.sum()).tolist()))
        ids, q = tree.draft_dists[depth]
        assert tree.tokens[depth] in ids and q == pytest.approx([want[t] for t in ids], rel=1e-5)
    assert drafter.propose([request])[0] == tree
