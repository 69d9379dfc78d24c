"""EAGLE drafter on a tiny random target and head: its trees are the budget best-scored nodes, its
cached catch-up and tree-masked expansion equal plain uncached head forwards, and its per-sequence
state follows the history through growth and rollback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specserve.drafters.base import DraftRequest
from specserve.drafters.eagle import EagleDraftConfig, EagleDrafter
from specserve.engine.config import ModelConfig
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.model import LlamaModel
from specserve.errors import InvalidRequestError
from specserve.learned.eagle_head import EagleHead, new_eagle_head

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=128)
_rng = torch.Generator().manual_seed(0)
HISTORY = torch.randint(0, TINY.vocab_size, (40,), generator=_rng).tolist()  # t_0 .. t_39
HIDDEN = torch.randn(40, TINY.hidden_size, generator=_rng)  # h_i of HISTORY's token i
OTHER_HIDDEN = torch.randn(40, TINY.hidden_size, generator=_rng)  # h after a divergence


def tiny_head() -> EagleHead:
    """A random head over a 48-token draft vocabulary (a shuffled half of the target's)."""
    torch.manual_seed(0)
    target = LlamaModel(TINY)
    for param in target.parameters():
        nn.init.normal_(param, std=0.5)  # peaked enough that trees grow past depth 1
    head = new_eagle_head(target, torch.randperm(TINY.vocab_size)[:48])
    for param in head.parameters():
        nn.init.normal_(param, std=0.1)
    return head.eval()


def make_drafter(**config) -> EagleDrafter:
    """float32 unless told: the exact q that the reference forwards compute (the default drafts in bfloat16)."""
    return EagleDrafter(tiny_head(), EagleDraftConfig(**{"dtype": "float32", **config}))


def propose(drafter: EagleDrafter, token_ids: list[int], hidden: torch.Tensor, budget: int, seq_id: int = 0) -> DraftTree:
    request = DraftRequest(seq_id, token_ids, num_prompt_tokens=1, budget=budget, hidden_states=hidden)
    return drafter.propose([request])[0]


def assert_same_tree(got: DraftTree, want: DraftTree) -> None:
    assert got.tokens == want.tokens and got.parents == want.parents
    assert got.draft_probs == pytest.approx(want.draft_probs, rel=1e-4, abs=1e-7)


def paths(tree: DraftTree) -> list[tuple[int, ...]]:
    return [tuple(tree.tokens[j] for j in tree.path_to(i)) for i in range(tree.num_nodes)]


@torch.inference_mode()
def reference_distribution(head: EagleHead, token_ids: list[int], hidden: torch.Tensor, path: tuple[int, ...]) -> dict[int, float]:
    """q(. | history + path) by uncached, untreed forwards: every pair from scratch, features fed back."""
    n = len(token_ids) - 1
    prev, tokens = list(hidden[:n]), list(token_ids[1:])  # pairs (h_{i-1}, t_i), i = 1..n

    def last_feature() -> torch.Tensor:
        positions = torch.arange(1, len(tokens) + 1)
        features, _ = head(torch.stack(prev)[None], torch.tensor(tokens)[None], positions[None])
        return features[0, -1]

    for token in path:  # a pair's feature stands in for the h it predicts
        prev.append(last_feature())
        tokens.append(token)
    probs = head.draft_logits(last_feature()).softmax(-1)  # [draft_vocab]
    return dict(zip(head.token_map.tolist(), probs.tolist()))


def test_config_rejects_zero_sizes_and_unknown_dtypes():
    with pytest.raises(InvalidRequestError):
        EagleDraftConfig(beam=0)
    with pytest.raises(InvalidRequestError, match="dtype"):
        EagleDraftConfig(dtype="int8")


def test_bfloat16_drafting_stays_close_to_float32():
    """The default drafts with bfloat16 weights: the same budget, nearly the same q of each drafted
    token (bfloat16 keeps ~3 significant digits of each weight)."""
    exact, fast = make_drafter(), make_drafter(dtype="bfloat16")
    assert fast.draft_lm_head.dtype == torch.bfloat16
    want = propose(exact, HISTORY[:30], HIDDEN[:29], budget=8)
    got = propose(fast, HISTORY[:30], HIDDEN[:29], budget=8)
    assert got.num_nodes == 8 and got.tokens[0] == want.tokens[0]
    assert got.draft_probs[0] == pytest.approx(want.draft_probs[0], rel=0.05)
    assert got.draft_probs != want.draft_probs  # it did draft in bfloat16


@pytest.mark.parametrize("budget", [1, 3, 16])
def test_tree_fills_the_budget_within_the_limits(budget):
    tree = propose(make_drafter(), HISTORY[:30], HIDDEN[:29], budget)
    assert tree.num_nodes == budget  # DraftTree itself checks order, distinct siblings and probs
    assert max(tree.depths()) <= 6
    assert all(len(kids) <= 8 for kids in tree.children().values())


def reference_tree(head: EagleHead, token_ids: list[int], hidden: torch.Tensor, budget: int,
                   config: EagleDraftConfig) -> dict[tuple[int, ...], float]:
    """Plain EAGLE-2 on uncached forwards: grow every depth from its `beam` best nodes, keep the
    `budget` best paths (score, then shallower, then first grown). Path -> its q, in growing order."""
    def top_children(path: tuple[int, ...]) -> list[tuple[tuple[int, ...], float]]:
        dist = reference_distribution(head, token_ids, hidden, path)
        return [(path + (t,), dist[t]) for t in sorted(dist, key=dist.get, reverse=True)[: config.top_k]]

    probs, scores = {}, {(): 1.0}
    newest = top_children(())
    for depth in range(1, config.max_depth + 1):
        for path, prob in newest:
            probs[path], scores[path] = prob, scores[path[:-1]] * prob
        if depth == config.max_depth:
            break
        expand = sorted((path for path, _ in newest), key=lambda p: -scores[p])[: config.beam]
        newest = [child for path in expand for child in top_children(path)]
    order = list(probs)
    best = set(sorted(order, key=lambda p: (-scores[p], len(p), order.index(p)))[:budget])
    return {path: probs[path] for path in order if path in best}


# Lengths 13 and 23 have parents just above the budget's bar whose children still make it (where a
# drafter that skips expansions too eagerly goes wrong).
@pytest.mark.parametrize("num_tokens", [13, 23, 30])
@pytest.mark.parametrize("budget", [1, 3, 8, 16])
@pytest.mark.parametrize("config", [EagleDraftConfig(dtype="float32"),
                                    EagleDraftConfig(top_k=3, beam=2, max_depth=4, dtype="float32")])
def test_tree_is_plain_eagle2_on_uncached_forwards(num_tokens, budget, config):
    drafter = EagleDrafter(tiny_head(), config)
    tree = propose(drafter, HISTORY[:num_tokens], HIDDEN[: num_tokens - 1], budget)
    want = reference_tree(drafter.head, HISTORY[:num_tokens], HIDDEN, budget, config)
    assert paths(tree) == list(want)
    assert tree.draft_probs == pytest.approx(list(want.values()), rel=1e-4)


def test_depth1_matches_head():
    drafter = make_drafter(max_depth=1)
    propose(drafter, HISTORY[:20], HIDDEN[:19], budget=8)  # cached pairs, then a 3-pair masked catch-up
    tree = propose(drafter, HISTORY[:23], HIDDEN[:22], budget=8)
    want = reference_distribution(drafter.head, HISTORY[:23], HIDDEN, path=())
    top = sorted(want, key=want.get, reverse=True)[:8]
    assert tree.tokens == top and tree.parents == [ROOT] * 8
    assert tree.draft_probs == pytest.approx([want[t] for t in top], rel=1e-4)


def test_every_node_has_the_probability_of_its_explicit_path():
    drafter = make_drafter()
    tree = propose(drafter, HISTORY[:30], HIDDEN[:29], budget=16)
    assert max(tree.depths()) >= 3 and len(tree.children()[ROOT]) >= 2  # several branches batched per forward
    for node, path in enumerate(paths(tree)):
        want = reference_distribution(drafter.head, HISTORY[:30], HIDDEN, path[:-1])
        assert tree.draft_probs[node] == pytest.approx(want[path[-1]], rel=1e-4)
        assert sorted(want.values(), reverse=True).index(want[path[-1]]) < 8  # one of its parent's top-k


def test_growing_history_matches_a_fresh_drafter():
    drafter = make_drafter()
    propose(drafter, HISTORY[:20], HIDDEN[:19], budget=16)
    grown = propose(drafter, HISTORY[:23], HIDDEN[:22], budget=16)
    assert_same_tree(grown, propose(make_drafter(), HISTORY[:23], HIDDEN[:22], budget=16))


@pytest.mark.parametrize("cut", [5, 12, 19])
def test_rolled_back_history_matches_a_fresh_drafter(cut):
    """The history keeps t_0 .. t_{cut-1}, then diverges; h from the divergence on is new."""
    diverged = HISTORY[:cut] + [(t + 1) % TINY.vocab_size for t in HISTORY[cut:cut + 4]]
    hidden = torch.cat([HIDDEN[:cut], OTHER_HIDDEN[cut:]])[: len(diverged) - 1]
    drafter = make_drafter()
    propose(drafter, HISTORY[:20], HIDDEN[:19], budget=16)
    assert_same_tree(propose(drafter, diverged, hidden, 16), propose(make_drafter(), diverged, hidden, 16))
    shorter = propose(drafter, HISTORY[:cut], HIDDEN[: cut - 1], 16)  # back to a strict prefix
    assert_same_tree(shorter, propose(make_drafter(), HISTORY[:cut], HIDDEN[: cut - 1], 16))


def test_a_batch_equals_one_call_per_sequence():
    drafter = make_drafter()
    requests = [DraftRequest(0, HISTORY[:25], 1, 16, HIDDEN[:24]), DraftRequest(1, HISTORY[:12], 1, 5, HIDDEN[:11])]
    for request, tree in zip(requests, drafter.propose(requests)):
        single = propose(make_drafter(), request.token_ids, request.hidden_states, request.budget)
        assert_same_tree(tree, single)


def test_lone_root_gets_an_empty_tree():
    assert propose(make_drafter(), HISTORY[:1], HIDDEN[:0], budget=4).num_nodes == 0


def test_missing_hidden_states_is_an_engine_bug():
    with pytest.raises(AssertionError):
        propose(make_drafter(), HISTORY[:10], None, budget=4)
    with pytest.raises(AssertionError):
        propose(make_drafter(), HISTORY[:10], HIDDEN[:8], budget=4)


def test_release_forgets_and_ignores_unknown_ids():
    drafter = make_drafter()
    propose(drafter, HISTORY[:10], HIDDEN[:9], budget=4, seq_id=7)
    assert 7 in drafter.contexts
    drafter.release(7)
    drafter.release(12345)
    assert drafter.contexts == {}


@pytest.mark.parametrize("width,parents", [(1, [ROOT, 0, 1, 2]), (2, [ROOT, ROOT, 0, 2]), (4, [ROOT] * 4)])
def test_sampled_tree_rows_carry_the_heads_q_of_their_path(width, parents):
    """At T > 0: `width` root children drawn without replacement, then a chain under the first; each
    sampled row holds q(. | history + its path) at the request's temperature, as uncached forwards
    compute it; a seed fixes the draws."""
    from specserve.engine.config import SamplingParams

    params = SamplingParams(temperature=0.7, seed=3)
    drafter = make_drafter(sample_width=width)
    request = DraftRequest(0, HISTORY[:30], num_prompt_tokens=1, budget=4, hidden_states=HIDDEN[:29], sampling=params)
    tree = drafter.propose([request])[0]
    assert tree.parents == parents
    assert sorted(tree.draft_dists) == sorted({parent + 1 for parent in parents})  # every row with children
    for row, (ids, probs) in tree.draft_dists.items():
        path = tuple(tree.tokens[i] for i in tree.path_to(row - 1))
        q = reference_distribution(drafter.head, HISTORY[:30], HIDDEN[:29], path)
        tempered = torch.tensor(list(q.values())).log().div(0.7).softmax(-1)  # the request's temperature
        want = dict(zip(q.keys(), tempered.tolist()))
        assert len(ids) == len(want)  # 48 draft tokens, under SUPPORT: nothing cut
        assert probs == pytest.approx([want[t] for t in ids], rel=1e-4, abs=1e-6)
    assert make_drafter(sample_width=width).propose([request])[0] == tree
