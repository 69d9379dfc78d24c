"""Speculative decoding in the engine, on the real model: greedy output equals plain greedy decoding of the
same engine and dtype token for token; KV blocks all come back; bad speculation settings are clear errors.

Exactness and float rounding: a verify forward computes a token's logits among other rows, a plain decode
alone. The linears are batch-invariant (engine/quant.py), the default float32 attention is not. Where that
alone flips a near-tie, the outputs part ways at a position whose top-2 logit gap (under plain decoding) is
below TIE_EPS[dtype]; such a prompt counts as a tie, is reported, and may not exceed MAX_TIES. Any other
difference fails. With `EngineConfig.batch_invariant` (float64 attention) no tie is allowed: outputs must
be identical. int8 and bfloat16 are tested only that way: their rounding of a linear's input turns a
last-bit attention difference into a visibly different logit (measured: |logit diff| ~1 four tokens after a
1.5e-5 attention difference), so without it their speculation is lossless only up to such flips.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from specserve.engine.config import (
    LEARNED_METHODS,
    CacheConfig,
    EngineConfig,
    SamplingParams,
    SchedulerConfig,
    SpecConfig,
)
from specserve.engine.draft_budget import StepCost
from specserve.engine.llm_engine import LLMEngine, build_model
from specserve.errors import InvalidRequestError
from specserve.kernels.paged_attention import build_attention_metadata
from specserve.engine.model_runner import allocate_kv_cache

NUM_PROMPTS, MAX_TOKENS = 20, 128
# The cells CI runs (IN_CI below) take CI_PROMPTS of the NUM_PROMPTS, spread the same way: one wave of 8.
CI_PROMPTS = 8
# Top-2 logit gap below which a differing token counts as a float-rounding tie (float32 logits move by
# ~1e-5 between batch shapes).
TIE_EPS = {"float32": 1e-3}  # batch-invariant engines: 0 (no tie allowed)
MAX_TIES = 2


@pytest.fixture(scope="module")
def spread_prompts(tokenizer, spec_bench_prompts) -> list[list[int]]:
    """NUM_PROMPTS chat prompts spread over every Spec-Bench category (the file is sorted by category)."""
    step = len(spec_bench_prompts) // NUM_PROMPTS
    chosen = spec_bench_prompts[::step][:NUM_PROMPTS]
    return [tokenizer.render_prompt_ids([{"role": "user", "content": p}]) for p in chosen]


@pytest.fixture(scope="module")
def ci_prompts(spread_prompts) -> list[list[int]]:
    """CI_PROMPTS of `spread_prompts`, evenly spaced, so they still span the categories."""
    return [spread_prompts[i * len(spread_prompts) // CI_PROMPTS] for i in range(CI_PROMPTS)]


@pytest.fixture(scope="module")
def models(llama_model, model_path):
    built = {"float32": llama_model}

    def get(dtype: str):
        if dtype not in built:
            built[dtype] = build_model(str(model_path), dtype)
        return built[dtype]

    return get


@pytest.fixture(scope="module")
def datastore_path(tmp_path_factory, data_dir, model_path) -> str:
    """A retrieval datastore from the first 4000 rows of the training corpora (never benchmark prompts)."""
    from specserve.drafters.datastore import build_datastore_file

    path = tmp_path_factory.mktemp("datastore") / "train.npz"
    corpora = [data_dir / "train" / name for name in ("sharegpt_v3_prompts.jsonl", "code_alpaca_2k.jsonl")]
    build_datastore_file(corpora, path, model_path, max_docs=4000)
    return str(path)


@pytest.fixture(scope="module")
def distill_cache(tmp_path_factory) -> Path:
    """One distilled corpus (16 training prompts, 64-token responses) for every learned drafter here."""
    return tmp_path_factory.mktemp("distill")


def train_small(kind: str, cache: Path, data_dir: Path, model_path: Path, lr: float) -> str:
    """A small learned drafter distilled from the real model on training prompts (never benchmark ones): it
    drafts well enough to have some drafts accepted, which is all the exactness test needs."""
    from specserve.learned.distill_data import DistillConfig
    from specserve.learned.fit import TrainConfig
    from specserve.learned.train_draft import TrainDraftConfig, train_draft

    config = TrainDraftConfig(model_path=str(model_path), train_dir=data_dir / "train", cache_dir=cache, kind=kind,
                              out=cache.parent / f"{kind}.safetensors",
                              distill=DistillConfig(num_prompts=16, max_new_tokens=64),
                              train=TrainConfig(epochs=8, batch_size=4, lr=lr), draft_vocab_size=2048)
    return train_draft(config).checkpoint


# Learning rates that get each kind's small drafter some accepted drafts on the small corpus.
SMALL_LR = {"eagle": 3e-3, "medusa": 1e-2, "draft-model": 1e-3, "exit-head": 1e-3}


@pytest.fixture(scope="module")
def learned_checkpoint(distill_cache, data_dir, model_path):
    """kind -> the checkpoint of a small drafter of that kind, trained once per module when first asked for."""
    made: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in made:
            made[kind] = train_small(kind, distill_cache, data_dir, model_path, lr=SMALL_LR[kind])
        return made[kind]

    return get


def make_engine(
    model, tokenizer, dtype: str, spec: SpecConfig, max_num_seqs: int, batch_invariant: bool = False,
    kv_dtype: str = "float32", budget: str = "static",
) -> LLMEngine:
    """The static speculation budget by default: these tests check what verification does with drafts, so
    every step drafts, where the cost budget (measured timings) may draft nothing at batch 8."""
    config = EngineConfig(
        model_path="unused", dtype=dtype, spec=dataclasses.replace(spec, speculation_budget=budget),
        cache=CacheConfig(num_blocks=1024, dtype=kv_dtype),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs), batch_invariant=batch_invariant,
    )
    return LLMEngine(config, model, tokenizer)


def generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    completions = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.requests
    return [c.token_ids for c in completions]


_plain: dict[tuple[str, bool, str, int], list[list[int]]] = {}


def plain_greedy(model, tokenizer, dtype: str, batch_invariant: bool, prompts: list[list[int]],
                 kv_dtype: str = "float32") -> list[list[int]]:
    """Plain greedy outputs of the engine (8 sequences at a time), computed once per engine kind and prompt
    set (the full NUM_PROMPTS or CI's CI_PROMPTS)."""
    key = (dtype, batch_invariant, kv_dtype, len(prompts))
    if key not in _plain:
        engine = make_engine(model, tokenizer, dtype, SpecConfig(), max_num_seqs=8, batch_invariant=batch_invariant,
                             kv_dtype=kv_dtype)
        _plain[key] = generate(engine, prompts)
    return _plain[key]


def next_logits(model, ids: list[int]) -> torch.Tensor:
    """Plain forward over `ids`: the next-token logits `# [vocab]`."""
    cache = CacheConfig(block_size=16, num_blocks=-(-len(ids) // 16))
    kv = allocate_kv_cache(model.config, cache, torch.float32)
    meta = build_attention_metadata([len(ids)], [len(ids)], [list(range(cache.num_blocks))], cache.block_size)
    logits, _ = model(torch.tensor(ids), torch.arange(len(ids)), kv, meta, torch.tensor([len(ids) - 1]))
    return logits[0]


def top2_gap(model, ids: list[int]) -> tuple[float, list[int]]:
    """Plain forward over `ids`: the gap between the two largest next-token logits, and their tokens."""
    top = next_logits(model, ids).topk(2)
    return (top.values[0] - top.values[1]).item(), top.indices.tolist()


def count_ties(model, dtype: str, prompts, expected, actual, tie_eps: float) -> int:
    """Number of prompts whose outputs differ only by a near-tie (top-2 gap < tie_eps); fails on any other
    difference."""
    ties = []
    for i, (prompt, want, got) in enumerate(zip(prompts, expected, actual)):
        if want == got:
            continue
        k = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        assert k < min(len(want), len(got)), f"prompt {i}: one output is a prefix of the other"
        gap, top2 = top2_gap(model, prompt + want[:k])
        assert gap < tie_eps and {want[k], got[k]} <= set(top2), (
            f"{dtype} prompt {i}: speculative output differs from plain greedy at token {k} "
            f"({got[k]} vs {want[k]}), top-2 gap {gap:.2e}, allowed below {tie_eps}"
        )
        ties.append((i, k, gap))
    if ties:
        warnings.warn(f"{dtype}: {len(ties)} near-tie flips (prompt, position, gap): {ties}")
    return len(ties)


# Every drafter x batch size x engine kind: float32 as shipped (near-ties allowed), and float32, int8 and
# bfloat16 with batch-invariant attention (identical outputs). CI runs the cells in IN_CI, `make test-slow`
# the rest. CI's 25-minute budget picks the cells: every drafter and engine kind once, at batch 8 but for
# auto (n-gram and retrieval at batch 1, the engine's batch-1 path); n-gram alone runs on the int8 and
# bfloat16 engines. CI's cells take CI_PROMPTS of the prompts (x MAX_TOKENS): on a 2-core AVX2 host the
# full 20 made this file ~17 of the suite's 37 minutes. Every cell on all NUM_PROMPTS, batch 1 included,
# runs in `make test-slow`.
METHODS = ("ngram", "rest", "early-exit", "eagle", "medusa", "draft-model", "exit-head", "auto")
ENGINES = [("float32", False), ("float32", True), ("int8", True), ("bfloat16", True)]
IN_CI = {
    ("rest", "float32", 8, False), ("auto", "float32", 1, False), ("early-exit", "float32", 8, False),
    ("eagle", "float32", 8, False), ("medusa", "float32", 8, False), ("draft-model", "float32", 8, False),
    ("exit-head", "float32", 8, False),
    ("ngram", "int8", 8, True), ("ngram", "bfloat16", 8, True),
}
GRID = [
    pytest.param(method, dtype, seqs, invariant,
                 marks=() if (method, dtype, seqs, invariant) in IN_CI else pytest.mark.slow)
    for dtype, invariant in ENGINES for method in METHODS for seqs in (1, 8)
]


@pytest.mark.parametrize("method,dtype,max_num_seqs,batch_invariant", GRID)
def test_greedy_speculation_equals_plain_greedy(
    request, models, tokenizer, spread_prompts, ci_prompts, method, dtype, max_num_seqs, batch_invariant
):
    model = models(dtype)
    prompts = ci_prompts if (method, dtype, max_num_seqs, batch_invariant) in IN_CI else spread_prompts
    expected = plain_greedy(model, tokenizer, dtype, batch_invariant, prompts)
    # Each resource is built (once per module) only by the cells that need it.
    datastore = request.getfixturevalue("datastore_path") if method in ("rest", "auto") else None
    # auto merges a trained drafter of any kind with n-gram and retrieval: Medusa here (EAGLE alone is tested).
    learned = method if method in LEARNED_METHODS else "medusa" if method == "auto" else None
    checkpoint = request.getfixturevalue("learned_checkpoint")(learned) if learned else None
    spec = SpecConfig(method=method, datastore_path=datastore, draft_checkpoint=checkpoint)
    engine = make_engine(model, tokenizer, dtype, spec, max_num_seqs, batch_invariant)
    actual = generate(engine, prompts)
    tie_eps = 0.0 if batch_invariant else TIE_EPS[dtype]
    assert count_ties(model, dtype, prompts, expected, actual, tie_eps) <= MAX_TIES
    # The drafter really drafted and the verifier really accepted: the test exercises speculation.
    assert engine.spec_stats.verify_steps > 0 and engine.spec_stats.accepted > 0


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_greedy_speculation_is_exact_over_a_rounded_kv_cache(models, tokenizer, ci_prompts, kv_dtype):
    """A bfloat16 or int8 cache rounds K/V once, when written (int8: each row with its own scale, never
    the step's other rows); verify rows and decode rows then read the same values, so greedy n-gram
    speculation still equals plain greedy decoding of that engine exactly."""
    model = models("float32")
    expected = plain_greedy(model, tokenizer, "float32", True, ci_prompts, kv_dtype=kv_dtype)
    engine = make_engine(model, tokenizer, "float32", SpecConfig(method="ngram"), 8, True, kv_dtype=kv_dtype)
    assert engine.runner.kv_cache[0][0].dtype == getattr(torch, kv_dtype) and engine.runner.attention_backend == "cpu"
    assert generate(engine, ci_prompts) == expected
    assert engine.spec_stats.verify_steps > 0 and engine.spec_stats.accepted > 0


def test_penalized_greedy_speculation_equals_penalized_plain_greedy(llama_model, tokenizer, spread_prompts):
    """Each tree row is penalized with its own path (engine/step_outcome.py), as plain decoding would be at
    that position, and biased; batch-invariant attention, so no tie is allowed."""
    penalties = {"presence_penalty": 0.4, "frequency_penalty": 0.3, "repetition_penalty": 1.2,
                 "logit_bias": ((tokenizer.encode(" the")[0], -100.0), (tokenizer.encode(",")[0], 2.0))}
    params = SamplingParams(max_tokens=48, ignore_eos=True, **penalties)
    prompts = spread_prompts[::4]
    runs = {method: make_engine(llama_model, tokenizer, "float32", SpecConfig(method=method), 8, True)
            .generate(prompts, params) for method in ("off", "ngram")}
    unpenalized = make_engine(llama_model, tokenizer, "float32", SpecConfig(), 8, True).generate(
        prompts, SamplingParams(max_tokens=48, ignore_eos=True))
    assert [c.token_ids for c in runs["ngram"]] == [c.token_ids for c in runs["off"]]
    assert sum(c.spec.accepted for c in runs["ngram"]) > 0  # few: penalties discourage the repeats n-grams find
    assert sum(a.token_ids != b.token_ids for a, b in zip(runs["off"], unpenalized)) >= 3


def test_speculation_stats_reach_completions(llama_model, tokenizer, spread_prompts):
    engine = make_engine(llama_model, tokenizer, "float32", SpecConfig(method="ngram"), 1)
    (completion,) = engine.generate(spread_prompts[:1], SamplingParams(max_tokens=64))
    stats = completion.spec
    assert stats.forwards >= 1 and stats.tokens == len(completion.token_ids)
    assert stats.mean_accepted_len == len(completion.token_ids) / stats.forwards
    assert stats.accepted <= stats.drafted


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "medusa-ish"}, "unknown drafter"),
    ({"method": "ngram", "num_draft_tokens": 0}, "budgets must be > 0"),
    ({"method": "ngram", "max_draft_tokens_per_step": -1}, "budgets must be > 0"),
    ({"method": "early-exit", "exit_layer": 0}, "exit_layer must be >= 1"),
    ({"method": "ngram", "speculation_budget": "greedy"}, "speculation_budget must be one of cost, static"),
])
def test_bad_speculation_settings_are_clear_errors(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SpecConfig(**kwargs)


def test_budget_shrinks_as_the_batch_grows():
    spec = SpecConfig(method="ngram", num_draft_tokens=8, max_draft_tokens_per_step=32)
    assert [spec.budget_per_sequence(n) for n in (1, 4, 8, 32, 64)] == [8, 8, 4, 1, 0]
    assert SpecConfig().budget_per_sequence(1) == 0


@pytest.mark.parametrize("row_cost,expected", [(0.0001, 5), (0.030, 0)])
def test_cost_budget_drafts_what_the_measured_rows_pay_for(llama_model, tokenizer, spread_prompts, row_cost, expected):
    """Rows nearly free (0.1 ms against a 10 ms step): the static budget; a row costing 3/4 of a step: no
    drafts at all. A seeded sampled request keeps the static budget either way (reproducible output)."""
    engine = make_engine(llama_model, tokenizer, "float32", SpecConfig(method="ngram"), 4, budget="cost")
    for prompt in spread_prompts[:3]:
        engine.add_request(prompt, SamplingParams(max_tokens=64))
    seeded = engine.add_request(spread_prompts[3], SamplingParams(max_tokens=64, temperature=0.8, seed=5))
    while any(seq.num_uncomputed_tokens > 1 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill, so that every sequence is decoding
    engine.step_cost = StepCost(refit_every=1)
    for rows in range(4, 4 + 24):  # a decode of 4 sequences is 10 ms; every extra row `row_cost` seconds
        engine.step_cost.observe(4, rows, 0.010 + row_cost * (rows - 4))
    decoding = list(engine.scheduler.running)
    budgets = engine._budgets(decoding)
    assert {seq_id: b for seq_id, b in budgets.items() if seq_id != seeded} == {
        seq.seq_id: expected for seq in decoding if seq.seq_id != seeded}
    assert budgets[seeded] == 5
    engine.config = dataclasses.replace(engine.config, spec=SpecConfig(method="ngram", speculation_budget="static"))
    assert set(engine._budgets(decoding).values()) == {5}


@pytest.mark.parametrize("method", ["ngram", "early-exit"])
def test_seeded_sampling_with_speculation_is_reproducible(llama_model, tokenizer, spread_prompts, method):
    """n-gram guesses, early exit samples its drafts (drafters/sampling.py): the seed fixes both."""
    params = SamplingParams(max_tokens=48 if method == "ngram" else 24, temperature=0.8, top_p=0.95, seed=11)
    runs = []
    for _ in range(2):
        engine = make_engine(llama_model, tokenizer, "float32", SpecConfig(method=method, exit_layer=20), 4)
        trees = []
        propose = engine.drafter.propose
        engine.drafter.propose = lambda requests: trees.extend(propose(requests)) or trees[-len(requests):]
        runs.append([c.token_ids for c in engine.generate(spread_prompts[:3], params)])
        assert engine.spec_stats.verify_steps > 0 and engine.spec_stats.accepted > 0
        # Sampled drafts carry the q of every drafted row; guesses carry none.
        assert all(sorted(t.draft_dists) == list(range(t.num_nodes)) if method == "early-exit" else not t.draft_dists
                   for t in trees)
    assert runs[0] == runs[1]


def test_lossy_acceptance_spends_at_most_its_budget(llama_model, tokenizer, spread_prompts):
    from specserve.engine.acceptance import LossyConfig

    lossy = LossyConfig(top_k=2, min_ratio=0.3, budget=1.5)
    engine = make_engine(llama_model, tokenizer, "float32", SpecConfig(method="ngram", lossy=lossy), 4)
    seen_budgets: list[float] = []
    original = engine._emit

    def spy(request, *emitted):
        seen_budgets.append(request.lossy_budget_left)
        return original(request, *emitted)

    engine._emit = spy
    completions = engine.generate(spread_prompts[:4], SamplingParams(max_tokens=64))
    assert all(c.token_ids for c in completions)
    # Some relaxation happened and was paid for, and no request went past its budget.
    assert -1e-9 <= min(seen_budgets) < lossy.budget and max(seen_budgets) <= lossy.budget
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# 0.1% critical values of chi-square by degrees of freedom.
CHI2_CRIT_0001 = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def second_token_chi2(engine: LLMEngine, prompt: list[int], first: int, target: torch.Tensor, draws: int) -> float:
    """Sample 4 tokens `draws` times at temperature 1 (one seed each); of the runs whose first token is
    `first` (sampled plainly at prefill), the second token comes from the first verify step (an accepted
    draft or the correction): chi-square of its counts over `target`'s 6 most likely tokens and the rest,
    over the 0.1% critical value."""
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, ignore_eos=True) for s in range(draws)]
    seconds = [c.token_ids[1] for c in engine.generate([prompt] * draws, params) if c.token_ids[0] == first]
    top = target.topk(6).indices.tolist()
    observed = [sum(t == k for t in seconds) for k in top] + [sum(t not in top for t in seconds)]
    expected = [len(seconds) * target[k].item() for k in top] + [len(seconds) * (1 - target[top].sum().item())]
    cells = [(o, e) for o, e in zip(observed, expected) if e >= 5]
    assert len(cells) >= 5 and len(seconds) > draws // 5, (observed, expected)
    return sum((o - e) ** 2 / e for o, e in cells) / CHI2_CRIT_0001[len(cells) - 1]


# ~275 of 300 runs start with " Celsius". Measured at 450 draws, chi-square / critical value: 0.19 with the
# rejection step, 78 with accept-everything.
SAMPLED_DRAWS = 300


def test_sampled_medusa_speculation_keeps_the_targets_distribution(models, tokenizer, learned_checkpoint, monkeypatch):
    """End to end on the real model with a trained (small) Medusa checkpoint sampling its drafts at T = 1:
    the first verified token follows the target's softmax; with the rejection step replaced by
    accept-everything, the same test fails (the drafts follow the heads' distribution, not the target's)."""
    from specserve.engine import verify

    model = models("float32")
    # The first token is nearly always the same (" Celsius", 92%: few runs are thrown away), the second spread
    # (the 6 likeliest 0.28 ... 0.045).
    prompt = tokenizer.encode("Water boils at 100 degrees")
    first = int(top2_gap(model, prompt)[1][0])
    target = torch.softmax(next_logits(model, prompt + [first]), -1)
    spec = SpecConfig(method="medusa", draft_checkpoint=learned_checkpoint("medusa"), max_draft_tokens_per_step=320)
    engine = make_engine(model, tokenizer, "float32", spec, max_num_seqs=64)
    assert second_token_chi2(engine, prompt, first, target, draws=SAMPLED_DRAWS) < 1.0  # below the 0.1% critical value
    assert engine.spec_stats.verify_steps > 0 and engine.spec_stats.accepted > 0

    def accept_all(tree, target_probs, draft_dists, generator):
        path = []
        while (children := [c for c in range(tree.num_nodes) if tree.parents[c] == (path[-1] if path else -1)]):
            path.append(children[0])
        bonus = int(torch.multinomial(target_probs[1 + path[-1] if path else 0], 1, generator=generator))
        return verify.Acceptance(path, [tree.tokens[i] for i in path], bonus, recovered=False)

    monkeypatch.setattr(verify, "accept_lossless", accept_all)
    broken = make_engine(model, tokenizer, "float32", spec, max_num_seqs=64)
    assert second_token_chi2(broken, prompt, first, target, draws=SAMPLED_DRAWS) > 1.0
