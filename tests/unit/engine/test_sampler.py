"""Sampler: greedy is argmax, filters keep exactly the expected tokens, seeded rows ignore their batch-mates,
and draws follow the filtered, temperature-scaled softmax (chi-square, with a check that the test has power).
"""

from __future__ import annotations

import math

import pytest
import torch

from specserve.engine.config import SamplingParams
from specserve.engine.sampler import (
    Sampler,
    adjust_logits,
    draw,
    greedy_tokens,
    probs_from_logits,
    token_logprobs,
)
from specserve.errors import InvalidRequestError

# Probabilities 1/2, 1/4, 1/8, 1/16, 1/16: every partial sum is exact in float32.
HALVING = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]).log()  # [1, 5]


def random_logits(rows: int, vocab: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    logits = random_logits(6, 50)
    tokens = Sampler().sample(logits, [SamplingParams()] * 6, [None] * 6)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_rows_get_a_one_hot_distribution():
    logits = random_logits(3, 50)
    probs = probs_from_logits(logits, [SamplingParams()] * 3)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(dim=-1), 50).float())


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_greedy(seed: int):
    logits = random_logits(4, 50, seed=seed)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=seed)] * 4
    tokens = Sampler().sample(logits, params, [seeded(seed) for _ in range(4)])
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "params,kept",
    [
        (SamplingParams(temperature=1.0, top_k=2), [0, 1]),
        (SamplingParams(temperature=1.0, top_p=0.7), [0, 1]),
        (SamplingParams(temperature=1.0, top_p=0.75), [0, 1]),  # 1/2 + 1/4 reaches 0.75: token 2 not needed
        (SamplingParams(temperature=1.0, top_p=0.8), [0, 1, 2]),
        (SamplingParams(temperature=1.0, min_p=0.2), [0, 1, 2]),  # keep p >= 0.1
        (SamplingParams(temperature=1.0, min_p=0.5), [0, 1]),  # keep p >= 0.25
        # top-p sees top-k's renormalized mass: 1/2, 1/4, 1/8 over 7/8 -> 4/7, 2/7, 1/7, and 6/7 >= 0.8.
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.8), [0, 1]),
        (SamplingParams(temperature=1.0), [0, 1, 2, 3, 4]),
    ],
)
def test_filters_keep_exactly_the_expected_tokens(params: SamplingParams, kept: list[int]):
    probs = probs_from_logits(HALVING, [params])[0]
    assert torch.nonzero(probs).flatten().tolist() == kept
    expected = HALVING[0, kept].exp()
    torch.testing.assert_close(probs[kept], expected / expected.sum())


def test_top_k_keeps_ties_at_the_boundary():
    probs = probs_from_logits(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), [SamplingParams(temperature=1.0, top_k=2)])
    assert torch.nonzero(probs[0]).flatten().tolist() == [0, 1, 2]


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row `# [vocab]`, filtered the plain way: full sort, HF order, ties at a boundary kept."""
    x = logits / params.temperature
    if params.top_k:
        x = x.masked_fill(x < x.sort(descending=True).values[min(params.top_k, x.numel()) - 1], -math.inf)
    if params.top_p < 1.0:
        sorted_x = x.sort(descending=True).values
        sorted_probs = sorted_x.softmax(-1)
        in_nucleus = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
        x = x.masked_fill(x < sorted_x[in_nucleus][-1], -math.inf)
    if params.min_p:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return x.softmax(-1)


GRID = [
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=2000, top_p=0.95),  # top-k beyond the 1024-logit head
    SamplingParams(temperature=0.9, top_k=50, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=2.0),
]


@pytest.mark.parametrize("params", GRID)
@pytest.mark.parametrize("vocab", [8, 300, 4096])
@pytest.mark.parametrize("scale", [0.1, 5.0])  # flat: the nucleus outgrows the head; peaked: it does not
def test_matches_plain_reference(params: SamplingParams, vocab: int, scale: float):
    logits = random_logits(3, vocab, scale=scale)
    probs = probs_from_logits(logits, [params] * 3)
    for row in range(3):
        expected = reference_probs(logits[row], params)
        assert torch.equal(probs[row] > 0, expected > 0)
        torch.testing.assert_close(probs[row], expected, rtol=1e-5, atol=1e-7)


def test_mixed_batch_rows_equal_rows_alone():
    # Rows take different paths (the 1024-logit head, or a full sort for a large top-k or a wide
    # nucleus); a row's distribution must not depend on which path its batch-mates take.
    logits = random_logits(len(GRID), 4096, scale=0.1)
    together = probs_from_logits(logits, GRID)
    for row, params in enumerate(GRID):
        assert torch.equal(together[row], probs_from_logits(logits[row : row + 1], [params])[0])


def test_seeded_row_ignores_its_batch_mates():
    logits = random_logits(5, 300, scale=1.0)
    mine = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    gen_alone, gen_batched = seeded(7), seeded(7)
    mates = [SamplingParams(), SamplingParams(temperature=1.2, top_k=5), mine, SamplingParams(temperature=0.5), mine]
    for _ in range(20):
        alone = Sampler().sample(logits[2:3], [mine], [gen_alone])
        batched = Sampler().sample(logits, mates, [None, seeded(1), gen_batched, seeded(2), seeded(3)])
        assert batched[2] == alone[0]
    assert torch.equal(probs_from_logits(logits, mates)[2], probs_from_logits(logits[2:3], [mine])[0])


def test_same_seed_same_draws():
    logits = random_logits(4, 300, scale=1.0)
    params = [SamplingParams(temperature=1.0, seed=3)] * 4

    def run() -> list[int]:
        generators = [seeded(3) for _ in range(4)]
        return [t for _ in range(10) for t in Sampler().sample(logits, params, generators).tolist()]

    assert run() == run()


def test_draw_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(2000, 5).contiguous()
    tokens = draw(probs, [seeded(0)] * 2000)
    assert set(tokens.tolist()) == {1, 3}


# Upper 0.001 quantile of chi-square with 7 degrees of freedom (8 categories), from standard tables
# (scipy.stats.chi2.ppf(0.999, 7) = 24.3219).
CHI2_7_DOF_P001 = 24.322


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_draws_follow_tempered_softmax():
    num_draws, temperature = 20_000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.5])  # [8]
    params = [SamplingParams(temperature=temperature, seed=0)] * num_draws
    tokens = Sampler().sample(logits.expand(num_draws, 8).contiguous(), params, [seeded(0)] * num_draws)
    counts = torch.bincount(tokens, minlength=8)
    assert chi_square(counts, (logits / temperature).softmax(-1)) < CHI2_7_DOF_P001
    # Power: the same draws are decisively rejected against the untempered softmax.
    assert chi_square(counts, logits.softmax(-1)) > 10 * CHI2_7_DOF_P001


def test_greedy_tokens_are_argmax_on_ties_and_nan():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows, vocab = trial % 8 + 1, [5, 49152, 1000][trial % 3]
        logits = torch.randint(-3, 3, (rows, vocab), generator=gen).float()  # many tied maxima per row
        if trial % 5 == 0:
            logits[0, trial % vocab] = float("nan")
        if trial % 7 == 0:
            logits[-1] = float("-inf")
        assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


def test_token_logprobs_are_the_raw_log_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.5]])
    expected = torch.log_softmax(logits, dim=-1)
    got = token_logprobs(logits, [1, 3], 2)
    assert [lp.token_id for lp in got] == [1, 3]
    assert [lp.logprob for lp in got] == pytest.approx([expected[0, 1].item(), expected[1, 3].item()])
    assert [t for t, _ in got[0].top] == [0, 1] and [t for t, _ in got[1].top] == [2, 3]
    assert got[1].top[0][1] == pytest.approx(expected[1, 2].item())
    assert [lp.top for lp in token_logprobs(logits, [0, 0], 0)] == [[], []]


def test_penalties_follow_openai_and_vllm():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    # prompt [0, 1], output [3, 3, 1]: repetition divides 0 and 3 by 2, multiplies 1 by 2 (negative);
    # presence and frequency count the output only: 3 twice, 1 once.
    got = adjust_logits(logits, params, context_ids=[0, 1, 3, 3, 1], output_ids=[3, 3, 1])
    expected = [[1.0, -2.0 - 0.5 - 0.25, 0.5, 1.5 - 0.5 - 0.5, 1.0]]
    torch.testing.assert_close(got, torch.tensor(expected))
    assert logits[0, 0] == 2.0  # the input is left alone


def test_logit_bias_adds_after_the_penalties():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(repetition_penalty=2.0, logit_bias=((0, -100.0), (2, 1.5)))
    got = adjust_logits(logits, params, context_ids=[0], output_ids=[])
    torch.testing.assert_close(got, torch.tensor([[1.0 - 100.0, 1.0, 1.5]]))


def test_penalties_of_tree_rows_count_their_paths():
    logits = torch.zeros(3, 4)
    params = SamplingParams(frequency_penalty=1.0)
    got = adjust_logits(logits, params, context_ids=[0, 2], output_ids=[2], extra_ids=[[], [1], [1, 1]])
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, -1.0, 0.0],
                                                  [0.0, -2.0, -1.0, 0.0]]))
    plain = adjust_logits(logits[2:], params, context_ids=[0, 2, 1, 1], output_ids=[2, 1, 1])
    torch.testing.assert_close(got[2:], plain)  # a path row is penalized as plain decoding would be there


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                         ("repetition_penalty", 0.0), ("logit_bias", ((3, 101.0),)),
                                         ("logit_bias", ((-1, 1.0),)), ("logit_bias", ((3, 1.0), (3, 2.0)))])
def test_out_of_range_penalties_are_refused(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})
