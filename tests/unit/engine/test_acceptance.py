"""Acceptance rules: greedy emits what greedy decoding would; lossless rejection sampling reproduces the
target's distribution (chi-square, each test paired with a broken rule it must catch); lossy relaxes only
within its stated limits and budget, and is the exact rule once the budget is spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from specserve.engine import acceptance
from specserve.engine.acceptance import LossyConfig, accept_greedy, accept_lossless, accept_lossy
from specserve.engine.config import CacheConfig, SamplingParams
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.model_runner import allocate_kv_cache
from specserve.engine.sampler import draw, probs_from_logits
from specserve.errors import InvalidRequestError
from specserve.kernels.paged_attention import build_attention_metadata


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tree(tokens: list[int], parents: list[int]) -> DraftTree:
    return DraftTree(tokens, parents, [1.0] * len(tokens))


def rows(*dists: torch.Tensor) -> torch.Tensor:
    """Per-row distributions `# [num_rows, vocab]` float32."""
    return torch.stack(dists).float()


def one_hot_rows(argmax: list[int], vocab: int = 10) -> torch.Tensor:
    """What `probs_from_logits` gives greedy rows: a one-hot at each row's argmax."""
    return torch.nn.functional.one_hot(torch.tensor(argmax), vocab).float()


def peaked_rows(argmax: list[int], vocab: int = 10) -> torch.Tensor:
    """A plain softmax per row whose argmax is the given token (and which leaves others some mass)."""
    return (one_hot_rows(argmax, vocab) * 3.0).softmax(dim=-1)


# ---- greedy ---------------------------------------------------------------------------------------

# tokens, parents, target argmax per row (root, then nodes), accepted nodes, next token, recovered
GREEDY_CASES = {
    "full_chain_then_bonus": ([5, 6, 7], [ROOT, 0, 1], [5, 6, 7, 8], [0, 1, 2], 8, False),
    "early_mismatch": ([5, 6, 7], [ROOT, 0, 1], [5, 9, 7, 8], [0], 9, True),
    "mismatch_at_first_node": ([5, 6, 7], [ROOT, 0, 1], [4, 6, 7, 8], [], 4, True),
    # root ─ 5 ─ 9
    #      └ 7 ─ 3     the target follows the second branch to its leaf
    "match_on_second_branch": ([5, 9, 7, 3], [ROOT, 0, ROOT, 2], [7, 9, 1, 3, 2], [2, 3], 2, False),
    "empty_tree": ([], [], [4], [], 4, False),
}


@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
def test_greedy(case):
    tokens, parents, argmax, accepted, next_token, recovered = case
    result = accept_greedy(tree(tokens, parents), argmax)
    assert result.accepted_nodes == accepted
    assert result.accepted_tokens == [tokens[i] for i in accepted]
    assert (result.next_token, result.recovered, result.divergence) == (next_token, recovered, 0.0)
    assert result.emitted_tokens == [*result.accepted_tokens, next_token]


@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
def test_lossless_on_one_hot_rows_is_greedy(case):
    """Greedy requests' rows are one-hots, where rejection sampling decides without chance."""
    tokens, parents, argmax, *_ = case
    draft = tree(tokens, parents)
    assert accept_lossless(draft, one_hot_rows(argmax), None, seeded(0)) == accept_greedy(draft, argmax)


# ---- lossless: exactness by chi-square ----------------------------------------------------------


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper-tail p-value of Pearson's statistic for `counts` against `probs` (same shape, any).

    Cells expected fewer than 5 times are pooled into one. scipy is not installed here, so the tail of
    chi-square with k degrees of freedom is Wilson & Hilferty's (1931) approximation: (X / k)^(1/3) is
    normal with mean 1 - 2/(9k) and variance 2/(9k). For k >= 4 it overstates the exact tail, by about
    10% at 1e-3 and 3x at 1e-7, so the checks that a broken rule is caught err on the strict side.
    A count on a zero-probability cell fails outright (p-value 0).
    """
    counts, probs = counts.flatten().double(), probs.flatten().double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    k = len(expected) - 1
    z = ((statistic / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


# A seeded test passes or fails the same way every run; 1e-3 leaves the exact rule room, and a broken
# rule must land far beyond it.
PASS_P, FAIL_P = 1e-3, 1e-6

# Broken rules, made by swapping one step of the real walk (so the test shows it catches exactly that):
BROKEN = {
    # after a rejection, keep drawing from the target p instead of the residual norm(max(0, p - q))
    "residual_is_target": ("_residual", lambda p, q, rejected: p),
    # the next child is judged against q itself, not q without the tokens already drawn
    "q_keeps_drawn_tokens": ("_without", lambda dist, token: dist),
}

VOCAB = 6
P = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])  # the target
Q = torch.tensor([0.05, 0.05, 0.10, 0.10, 0.30, 0.40])  # a draft that disagrees with it


def chain_from_q(g: torch.Generator) -> tuple[DraftTree, torch.Tensor, torch.Tensor | None]:
    """One child x ~ Q."""
    x = torch.multinomial(Q, 1, generator=g).tolist()
    return tree(x, [ROOT]), rows(P, P), rows(Q, Q)


def three_children_without_replacement(g: torch.Generator) -> tuple[DraftTree, torch.Tensor, torch.Tensor | None]:
    """Three children drawn one after another from Q without replacement."""
    xs = torch.multinomial(Q, 3, replacement=False, generator=g).tolist()
    return tree(xs, [ROOT] * 3), rows(P, P, P, P), rows(Q, Q, Q, Q)


def deterministic_tree(g: torch.Generator) -> tuple[DraftTree, torch.Tensor, torch.Tensor | None]:
    """root ─ 2 ─ 1     point-mass drafts (an n-gram drafter's guesses)
            └ 0"""
    return tree([2, 1, 0], [ROOT, 0, ROOT]), rows(P, P, P, P), None


CASES = {
    "chain_stochastic_q": chain_from_q,
    "tree_without_replacement": three_children_without_replacement,
    "tree_deterministic": deterministic_tree,
}
BROKEN_CASES = [
    ("chain_stochastic_q", "residual_is_target"),
    ("tree_without_replacement", "residual_is_target"),
    ("tree_without_replacement", "q_keeps_drawn_tokens"),
    ("tree_deterministic", "residual_is_target"),
]
NUM_TRIALS = 3000


def first_token_counts(make_step: Callable, num_trials: int = NUM_TRIALS, seed: int = 0) -> torch.Tensor:
    """How often each token comes first over seeded trials, each drafting afresh `# [vocab]`."""
    g = seeded(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(num_trials):
        draft, target_probs, draft_dists = make_step(g)
        counts[accept_lossless(draft, target_probs, draft_dists, g).emitted_tokens[0]] += 1
    return counts


@pytest.mark.parametrize("case", CASES)
def test_first_token_follows_the_target(case: str):
    assert chi_square_p_value(first_token_counts(CASES[case]), P) > PASS_P


@pytest.mark.parametrize("case,broken", BROKEN_CASES)
def test_chi_square_catches_a_broken_rule(case: str, broken: str, monkeypatch):
    monkeypatch.setattr(acceptance, *BROKEN[broken])
    assert chi_square_p_value(first_token_counts(CASES[case]), P) < FAIL_P


# Depth 2: the target's and the draft's next-token tables, row y = the distribution after token y.
VOCAB_2 = 5
P1 = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08])
P2 = torch.stack([torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08]).roll(y) for y in range(VOCAB_2)])  # [5, 5]
Q1 = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3])
Q2 = torch.stack([torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3]).roll(2 * y) for y in range(VOCAB_2)])  # [5, 5]


def first_two_token_counts(num_trials: int = NUM_TRIALS, seed: int = 0) -> torch.Tensor:
    """Counts of (first, second) emitted token over trials of a depth-2 chain x1 ~ Q1, x2 ~ Q2[x1]
    `# [5, 5]`. When only one token comes out, the next step (plain sampling) supplies the second."""
    g = seeded(seed)
    counts = torch.zeros(VOCAB_2, VOCAB_2)
    uniform = torch.full((VOCAB_2,), 1 / VOCAB_2)
    for _ in range(num_trials):
        x1 = int(torch.multinomial(Q1, 1, generator=g))
        x2 = int(torch.multinomial(Q2[x1], 1, generator=g))
        draft = DraftTree.chain([x1, x2])
        out = accept_lossless(draft, rows(P1, P2[x1], uniform), rows(Q1, Q2[x1], uniform), g).emitted_tokens
        if len(out) == 1:
            out.append(int(draw(P2[out[0]][None], [g])[0]))
        counts[out[0], out[1]] += 1
    return counts


def test_first_two_tokens_of_a_depth_2_chain_follow_the_target(monkeypatch):
    joint = P1[:, None] * P2  # [5, 5]: P(first = y1, second = y2)
    assert chi_square_p_value(first_two_token_counts(), joint) > PASS_P
    monkeypatch.setattr(acceptance, *BROKEN["residual_is_target"])
    assert chi_square_p_value(first_two_token_counts(), joint) < FAIL_P


@pytest.fixture(scope="module")
def real_first_token_logits(llama_model, tokenizer) -> torch.Tensor:  # [vocab]
    """The real model's logits for the first token of its answer to a chat prompt."""
    ids = tokenizer.render_prompt_ids([{"role": "user", "content": "Name one colour of the rainbow."}])
    n, block_size = len(ids), 16
    cache = CacheConfig(block_size=block_size, num_blocks=-(-n // block_size))
    kv = allocate_kv_cache(llama_model.config, cache, torch.float32)
    meta = build_attention_metadata([n], [n], [list(range(cache.num_blocks))], block_size)
    logits, _ = llama_model(torch.tensor(ids), torch.arange(n), kv, meta, torch.tensor([n - 1]))
    return logits[0]


def test_real_model_first_token_follows_the_target(real_first_token_logits, monkeypatch):
    """p: the model's top-8 at temperature 1; q: its top-8 at temperature 2 (same support, flatter).
    Two children drawn from q without replacement; the first emitted token must follow p."""
    logits = real_first_token_logits[None]  # [1, vocab]
    p = probs_from_logits(logits, [SamplingParams(temperature=1.0, top_k=8)])[0]
    q = probs_from_logits(logits, [SamplingParams(temperature=2.0, top_k=8)])[0]
    support = p.nonzero().flatten()
    assert len(support) >= 8 and torch.equal(support, q.nonzero().flatten())

    def counts(num_trials: int = 2000) -> torch.Tensor:  # [len(support)]
        g = seeded(0)
        found = torch.zeros(p.shape[0])
        for _ in range(num_trials):
            xs = support[torch.multinomial(q[support], 2, replacement=False, generator=g)].tolist()
            draft = tree(xs, [ROOT, ROOT])
            found[accept_lossless(draft, rows(p, p, p), rows(q, q, q), g).emitted_tokens[0]] += 1
        assert found.sum() == found[support].sum(), "a token outside top-8 came out"
        return found[support]

    assert chi_square_p_value(counts(), p[support]) > PASS_P
    monkeypatch.setattr(acceptance, *BROKEN["residual_is_target"])
    assert chi_square_p_value(counts(), p[support]) < FAIL_P


# ---- lossless: edge cases and determinism -------------------------------------------------------


def test_same_seed_same_acceptance():
    draft = tree([3, 1, 4, 5], [ROOT, ROOT, 0, 0])
    target, dists = rows(P, P.roll(1), P.roll(2), P, P), rows(Q, Q.roll(3), Q, Q, Q)
    runs = [[accept_lossless(draft, target, dists, g) for g in [seeded(seed)] * 5] for seed in (7, 7)]
    assert runs[0] == runs[1]
    assert len({str(a) for a in runs[0]}) > 1, "five steps from one generator should not all agree"


def test_zero_probability_token_is_never_accepted():
    target = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0])
    for seed in range(50):
        result = accept_lossless(tree([0], [ROOT]), rows(target, P), rows(Q, Q), seeded(seed))
        assert result.accepted_nodes == [] and result.recovered and result.next_token in (1, 2)


@pytest.mark.parametrize(
    "tokens,draft",
    [
        ([0], Q.roll(-1) * (torch.arange(VOCAB) != 0)),  # q(x) = 0 for the drafted token
        ([0, 1], torch.nn.functional.one_hot(torch.tensor(0), VOCAB)),  # a second child from a one-hot q
    ],
    ids=["zero_draft_probability", "second_child_from_one_hot_q"],
)
def test_impossible_draft_is_an_invalid_input(tokens: list[int], draft: torch.Tensor):
    target = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # rejects everything drafted
    draft_tree, num_rows = tree(tokens, [ROOT] * len(tokens)), 1 + len(tokens)
    with pytest.raises(AssertionError, match="draft probability 0"):
        accept_lossless(draft_tree, rows(*[target] * num_rows), rows(*[draft] * num_rows), seeded(0))


def test_residual_of_equal_distributions_falls_back_to_the_target_without_the_rejected_token():
    """p and q equal up to rounding: max(0, p - q) is noise, so the recovered token comes from p minus x."""
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.5 + 1e-12, 0.5 - 1e-12, 0.0], dtype=torch.float64)
    assert acceptance._residual(p, q, rejected=0).tolist() == [0.0, 1.0, 0.0]
    assert acceptance._residual(p, p, rejected=0).tolist() == [0.0, 1.0, 0.0]


# ---- lossy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("top_k", -1), ("top_k", 1.5), ("top_k", True), ("min_ratio", -0.1), ("min_ratio", 1.5),
     ("min_ratio", math.nan), ("budget", -1.0), ("budget", math.inf), ("budget", math.nan)],
)
def test_lossy_config_rejects_bad_values(field: str, value):
    with pytest.raises(InvalidRequestError, match=f"lossy {field}"):
        LossyConfig(**{field: value})


@pytest.mark.parametrize("budget", [0.0, -1e-12], ids=["spent", "rounded_below_zero"])
@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
def test_lossy_without_budget_is_greedy(case, budget: float):
    tokens, parents, argmax, *_ = case
    draft = tree(tokens, parents)
    lossy = accept_lossy(draft, peaked_rows(argmax), LossyConfig(top_k=0, min_ratio=0.0), budget, greedy=True)
    assert lossy == accept_greedy(draft, argmax)


@pytest.mark.parametrize("seed", range(5))
def test_lossy_without_budget_is_lossless(seed: int):
    xs = torch.multinomial(Q, 3, replacement=False, generator=seeded(100 + seed)).tolist()
    draft, target, dists = tree(xs, [ROOT] * 3), rows(P, P, P, P), rows(Q, Q, Q, Q)
    lossless = accept_lossless(draft, target, dists, seeded(seed))
    config = LossyConfig(top_k=0, min_ratio=0.0)
    assert accept_lossy(draft, target, config, 0.0, greedy=False, draft_dists=dists, generator=seeded(seed)) == lossless


# At the root row the target rates token 1 highest and token 2 at 3/4 of it: relaxing 2 costs log(4/3).
ROW = torch.tensor([0.1, 0.4, 0.3, 0.1, 0.05, 0.05])
COST_OF_2 = math.log(4 / 3)


@pytest.mark.parametrize(
    "config,budget,token,relaxed",
    [
        (LossyConfig(top_k=2, min_ratio=0.5), 1.0, 2, True),
        (LossyConfig(top_k=2, min_ratio=0.5), 0.25, 2, False),  # the cost does not fit the budget
        (LossyConfig(top_k=2, min_ratio=0.8), 1.0, 2, False),  # 0.3 < 0.8 * 0.4
        (LossyConfig(top_k=1, min_ratio=0.0), 1.0, 2, False),  # token 1 outranks it
        (LossyConfig(top_k=2, min_ratio=0.2), 2.0, 3, False),  # third (tied with 0) is outside top-2
        (LossyConfig(top_k=0, min_ratio=0.2), 2.0, 3, True),  # no rank limit, and 0.1 >= 0.2 * 0.4
    ],
)
def test_lossy_relaxes_only_within_its_limits(config: LossyConfig, budget: float, token: int, relaxed: bool):
    target = rows(ROW, peaked_rows([5], vocab=6)[0])  # the relaxed token's own row prefers 5
    result = accept_lossy(tree([token], [ROOT]), target, config, budget, greedy=True)
    if relaxed:
        assert (result.accepted_tokens, result.next_token, result.recovered) == ([token], 5, False)
        assert result.divergence == pytest.approx(math.log(0.4 / ROW[token].item()))
    else:
        assert (result.accepted_tokens, result.next_token, result.recovered, result.divergence) == ([], 1, True, 0.0)


@pytest.mark.parametrize("budget,accepted", [(0.4, 1), (0.6, 2)])
def test_lossy_budget_spans_the_path(budget: float, accepted: int):
    """Two relaxations at log(4/3) ~ 0.29 nats each: 0.4 pays for one, 0.6 for both."""
    result = accept_lossy(DraftTree.chain([2, 2]), rows(ROW, ROW, ROW), LossyConfig(), budget, greedy=True)
    assert result.accepted_tokens == [2] * accepted
    assert result.divergence == pytest.approx(accepted * COST_OF_2)


def test_lossy_keeps_the_cheapest_relaxable_child():
    config = LossyConfig(top_k=0, min_ratio=0.0)
    result = accept_lossy(tree([0, 2], [ROOT, ROOT]), rows(ROW, ROW, ROW), config, 5.0, greedy=True)
    assert result.accepted_nodes == [1] and result.divergence == pytest.approx(COST_OF_2)


def test_lossy_sampling_row_keeps_what_lossless_rejects():
    """Lossless accepts the point-mass draft 2 with probability p(2) = 0.3; lossy keeps it always,
    spending log(4/3) exactly when the rejection test turned it down."""
    spent = []
    for seed in range(200):
        draft = tree([2], [ROOT])
        result = accept_lossy(draft, rows(ROW, ROW), LossyConfig(), 1.0, greedy=False, generator=seeded(seed))
        assert result.accepted_tokens == [2]
        spent.append(result.divergence)
    assert all(s == 0.0 or s == pytest.approx(COST_OF_2) for s in spent)
    assert 0.2 < spent.count(0.0) / len(spent) < 0.4


def random_tree(g: torch.Generator, vocab: int, num_nodes: int) -> DraftTree:
    """Random parents, random tokens distinct among siblings."""
    tokens: list[int] = []
    parents: list[int] = []
    for i in range(num_nodes):
        parent = int(torch.randint(ROOT, i, (1,), generator=g))
        taken = {t for t, p in zip(tokens, parents) if p == parent}
        free = [t for t in range(vocab) if t not in taken]
        tokens.append(free[int(torch.randint(len(free), (1,), generator=g))])
        parents.append(parent)
    return tree(tokens, parents)


@pytest.mark.parametrize("seed", range(20))
def test_lossy_accepted_tokens_are_greedy_or_within_the_relaxation(seed: int):
    g, vocab, config, budget = seeded(seed), 8, LossyConfig(top_k=3, min_ratio=0.3), 1.5
    draft = random_tree(g, vocab, num_nodes=6)
    target = (torch.randn(1 + draft.num_nodes, vocab, generator=g) * 1.5).softmax(dim=-1)
    result = accept_lossy(draft, target, config, budget, greedy=True)
    spent = 0.0
    for node in result.accepted_nodes:
        p, x = target[draft.parents[node] + 1], draft.tokens[node]
        if x != int(p.argmax()):
            assert int((p > p[x]).sum()) < config.top_k and p[x] >= config.min_ratio * p.max()
            spent += math.log(p.max() / p[x])
    assert result.divergence == pytest.approx(spent, abs=1e-6) and result.divergence <= budget
    last_row = target[result.accepted_nodes[-1] + 1 if result.accepted_nodes else 0]
    assert result.next_token == int(last_row.argmax())


# ---- sampled drafts through the engine's acceptance (verify.accept, sparse q from the tree) ---------


def sampled_root_tree(draft_logits: torch.Tensor, params: SamplingParams, num_children: int,
                      g: torch.Generator) -> DraftTree:
    """A drafter's root children drawn by drafters/sampling.py, q carried sparse in the tree."""
    from specserve.drafters.sampling import sample_children

    tokens, probs, dist = sample_children(draft_logits, params, num_children, g)
    return DraftTree(tokens, [ROOT] * len(tokens), probs, {0: dist})


def emitted_first_tokens(target_logits: torch.Tensor, draft_logits: torch.Tensor, params: SamplingParams,
                         num_children: int, num_trials: int = NUM_TRIALS) -> torch.Tensor:
    """Counts of the first emitted token `# [vocab]` over seeded draft-and-verify trials."""
    from specserve.engine.verify import accept

    g = seeded(0)
    counts = torch.zeros(target_logits.shape[0])
    for _ in range(num_trials):
        draft = sampled_root_tree(draft_logits, params, num_children, g)
        logits = target_logits.expand(1 + draft.num_nodes, -1)  # every row: the same target row
        counts[accept(draft, logits, params, g).emitted_tokens[0]] += 1
    return counts


def test_sampled_children_through_accept_follow_the_target(monkeypatch):
    from specserve.engine import verify

    target_logits, draft_logits = P.log(), Q.log()
    assert chi_square_p_value(emitted_first_tokens(target_logits, draft_logits, T1, 2), P) > PASS_P
    # A verifier that reads the wrong q (here: uniform) is caught.
    monkeypatch.setattr(verify, "dense_draft_dists",
                        lambda tree, vocab: {0: torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)})
    assert chi_square_p_value(emitted_first_tokens(target_logits, draft_logits, T1, 2), P) < FAIL_P


def test_a_draft_distribution_equal_to_the_target_is_always_accepted():
    """min(1, p/q) = 1: with its q the sampled child always stands; as a point mass it would not."""
    from specserve.engine.verify import accept

    g = seeded(1)
    for _ in range(200):
        draft = sampled_root_tree(P.log(), T1, 1, g)
        assert accept(draft, P.log().expand(2, -1), T1, g).accepted_nodes == [0]
    point_masses = [accept(DraftTree(d.tokens, d.parents, d.draft_probs), P.log().expand(2, -1), T1, g)
                    for d in (sampled_root_tree(P.log(), T1, 1, g) for _ in range(200))]
    assert sum(not a.accepted_nodes for a in point_masses) > 50  # rejected with probability 1 - p(x)


T1 = SamplingParams(temperature=1.0)


def test_real_drafter_sampled_drafts_keep_the_targets_first_token(llama_model, tokenizer, real_first_token_logits):
    """A layer-chain drafter over all 30 layers is the model itself, so its q at the request's settings (T=1,
    top-k 8) is the target's p up to float rounding: its sampled root children must follow p and be
    accepted (min(1, p/q) = 1) nearly always. An argmax draft would be accepted with probability p(argmax)
    only (0.5 here)."""
    from specserve.drafters.base import DraftRequest
    from specserve.drafters.layer_chain import ChainConfig, LayerChainDrafter
    from specserve.engine.verify import accept

    ids = tokenizer.render_prompt_ids([{"role": "user", "content": "Name one colour of the rainbow."}])
    drafter = LayerChainDrafter(llama_model, llama_model.config.num_layers, ChainConfig(min_confidence=0.0))
    p = probs_from_logits(real_first_token_logits[None], [SamplingParams(temperature=1.0, top_k=8)])[0]
    g = seeded(2)
    drafted = torch.zeros(p.shape[0])
    accepted, num_trials = 0, 200
    for trial in range(num_trials):
        params = SamplingParams(temperature=1.0, top_k=8, seed=trial)
        draft = drafter.propose([DraftRequest(0, ids, len(ids), 1, sampling=params)])[0]
        assert draft.num_nodes == 1 and 0 in draft.draft_dists
        accepted += len(accept(draft, real_first_token_logits.expand(2, -1), params, g).accepted_nodes)
        drafted[draft.tokens[0]] += 1
    support = p > 0
    assert drafted[~support].sum() == 0
    assert chi_square_p_value(drafted[support], p[support]) > PASS_P
    assert accepted >= 0.98 * num_trials
