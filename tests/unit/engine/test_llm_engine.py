"""The engine loop on the real model: ragged batching, paging, prefix sharing, sampling, stops, bad input."""

from __future__ import annotations

import pytest
import torch

from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import InvalidRequestError

GREEDY_32 = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.fixture
def make_engine(llama_model, tokenizer):
    def make(block_size: int = 16, num_blocks: int = 256, max_num_seqs: int = 16, budget: int = 512) -> LLMEngine:
        config = EngineConfig(
            model_path="unused",
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
        )
        return LLMEngine(config, llama_model, tokenizer)

    return make


@pytest.fixture(scope="module")
def prompts(tokenizer, spec_bench_prompts) -> list[list[int]]:
    """Chat prompts of clearly different lengths."""
    chosen = [spec_bench_prompts[i] for i in (0, 10, 45, 90)]
    return [tokenizer.render_prompt_ids([{"role": "user", "content": p}]) for p in chosen]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.requests and not engine.has_unfinished()


def test_ragged_batch_equals_each_sequence_alone(make_engine, prompts):
    assert len({len(p) for p in prompts}) == len(prompts)
    engine = make_engine()
    together = engine.generate(prompts, GREEDY_32)
    alone = [make_engine().generate([p], GREEDY_32)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert_all_blocks_free(engine)


def test_chunked_prefill_equals_one_shot_prefill(make_engine, prompts):
    one_shot = make_engine().generate(prompts[:2], GREEDY_32)
    chunked = make_engine(budget=7).generate(prompts[:2], GREEDY_32)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in one_shot]


def test_paged_cache_equals_contiguous_cache(make_engine, prompts):
    """Block size 16 (sequences cross many block boundaries) against one block per sequence."""
    paged = make_engine(block_size=16).generate(prompts, GREEDY_32)
    contiguous = make_engine(block_size=1024, num_blocks=8).generate(prompts, GREEDY_32)
    assert [c.token_ids for c in paged] == [c.token_ids for c in contiguous]
    engine = make_engine(block_size=16)
    logits_paged = first_logits(engine, prompts[2])
    logits_contiguous = first_logits(make_engine(block_size=1024, num_blocks=8), prompts[2])
    assert (logits_paged - logits_contiguous).abs().max().item() < 1e-4


def first_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    engine.add_request(prompt, GREEDY_32)
    plan = engine.scheduler.schedule()
    logits = engine.runner.execute(plan.scheduled)
    return logits[0]


def test_shared_prefix_blocks_give_the_same_tokens(make_engine, tokenizer):
    system = "You are a careful assistant. Answer briefly and precisely, and always show your reasoning. " * 3
    convs = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}]
        for q in ("What is 17 times 3?", "Name three primary colours.")
    ]
    ids = [tokenizer.render_prompt_ids(c) for c in convs]
    unshared = [make_engine().generate([p], GREEDY_32)[0].token_ids for p in ids]
    engine = make_engine()
    first = engine.generate([ids[0]], GREEDY_32)[0]
    request_id = engine.add_request(ids[1], GREEDY_32)
    seq = engine.requests[request_id].seq
    engine.step()
    assert seq.num_cached_tokens >= 48  # the system prompt's full blocks came from the cache
    while engine.has_unfinished():
        engine.step()
    assert first.token_ids == unshared[0]
    assert seq.output_token_ids == unshared[1]
    assert_all_blocks_free(engine)


def test_preemption_under_block_pressure_keeps_output(make_engine, prompts):
    expected = make_engine().generate(prompts, GREEDY_32)
    small = make_engine(num_blocks=30)  # each fits alone, all four at once need ~50
    got = small.generate(prompts, GREEDY_32)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert_all_blocks_free(small)


def test_fixed_seed_reproduces_sampled_output(make_engine, prompts):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = make_engine().generate([prompts[0]], params)[0].token_ids
    again = make_engine().generate([prompts[0]], params)[0].token_ids
    batched = make_engine().generate([prompts[1], prompts[0], prompts[2]],
                                     [SamplingParams(max_tokens=24, temperature=1.0), params, GREEDY_32])[1]
    assert alone == again == batched.token_ids
    other_seed = make_engine().generate(
        [prompts[0]], SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    )[0].token_ids
    assert other_seed != alone


# Chi-square critical value at p = 0.001 by degrees of freedom (standard tables).
CHI2_CRIT_0001 = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def test_first_token_frequencies_match_softmax(make_engine, tokenizer):
    """400 seeded requests for one token each: counts of the top tokens follow the model's softmax."""
    prompt = tokenizer.encode("The best thing about living in a big city is")
    engine = make_engine(max_num_seqs=64, budget=2048)
    logits = first_logits(make_engine(), prompt)
    probs = torch.softmax(logits, -1)
    draws = 400
    params = [SamplingParams(max_tokens=1, temperature=1.0, seed=s) for s in range(draws)]
    tokens = [c.token_ids[0] for c in engine.generate([prompt] * draws, params)]
    top = probs.topk(6).indices.tolist()
    observed = [sum(t == k for t in tokens) for k in top] + [sum(t not in top for t in tokens)]
    expected = [draws * probs[k].item() for k in top] + [draws * (1 - probs[top].sum().item())]
    cells = [(o, e) for o, e in zip(observed, expected) if e >= 5]
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    assert len(cells) >= 4
    assert chi2 < CHI2_CRIT_0001[len(cells) - 1], (observed, expected)
    assert_all_blocks_free(engine)


def test_stop_string_truncates_and_streams_consistently(make_engine, tokenizer):
    engine = make_engine()
    prompt = tokenizer.render_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    free_run = engine.generate([prompt], SamplingParams(max_tokens=32))[0]
    assert "Paris" in free_run.text
    params = SamplingParams(max_tokens=32, stop=("Paris",))
    deltas = list(engine.stream(prompt, params))
    text = "".join(d.text_delta for d in deltas)
    assert text == free_run.text[: free_run.text.index("Paris")]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert_all_blocks_free(engine)


def test_logprobs_follow_the_tokens_a_request_keeps(make_engine, tokenizer, prompts):
    """One log probability per kept token (a stop string cuts both), read from the raw logits even when
    sampling at a temperature; requests that ask for none get None beside those that do."""
    prompt = tokenizer.render_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    raw = torch.log_softmax(first_logits(make_engine(), prompt), dim=-1)
    engine = make_engine()
    stopped, sampled, plain = engine.generate(
        [prompt, prompt, prompts[0]],
        [SamplingParams(max_tokens=32, stop=("Paris",), logprobs=3),
         SamplingParams(max_tokens=8, temperature=1.5, seed=3, logprobs=0), SamplingParams(max_tokens=4)])
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"
    assert [lp.token_id for lp in stopped.logprobs] == stopped.token_ids
    first = stopped.logprobs[0]
    assert first.logprob == pytest.approx(raw.max().item(), abs=1e-5)
    assert [t for t, _ in first.top] == raw.topk(3).indices.tolist()
    assert [lp.token_id for lp in sampled.logprobs] == sampled.token_ids and sampled.logprobs[0].top == []
    assert sampled.logprobs[0].logprob == pytest.approx(raw[sampled.token_ids[0]].item(), abs=1e-5)
    assert plain.logprobs is None
    assert_all_blocks_free(engine)


def test_logit_bias_bans_and_forces_tokens(make_engine, prompts):
    engine = make_engine()
    [free] = engine.generate([prompts[0]], SamplingParams(max_tokens=4))
    banned, forced = engine.generate([prompts[0]] * 2, [
        SamplingParams(max_tokens=4, logit_bias=((free.token_ids[0], -100.0),)),
        SamplingParams(max_tokens=4, logit_bias=((42, 100.0),)),
    ])
    assert banned.token_ids[0] != free.token_ids[0] and forced.token_ids == [42] * 4
    with pytest.raises(InvalidRequestError, match="logit_bias token ids must lie in"):
        engine.add_request(prompts[0], SamplingParams(logit_bias=((10**6, 1.0),)))
    assert_all_blocks_free(engine)


def test_finish_reasons(make_engine, tokenizer, prompts):
    engine = make_engine()
    prompt = tokenizer.render_prompt_ids([{"role": "user", "content": "Say hi."}])
    eos = engine.generate([prompt], SamplingParams(max_tokens=64))[0]
    assert eos.finish_reason == "stop" and eos.token_ids[-1] in tokenizer.eos_token_ids
    length = engine.generate([prompts[0]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert length.finish_reason == "length" and len(length.token_ids) == 5
    stop_id = eos.token_ids[1]
    by_id = engine.generate([prompt], SamplingParams(max_tokens=64, stop_token_ids=(stop_id,)))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == eos.token_ids[:2]


def test_abort_frees_blocks_at_once(make_engine, prompts):
    engine = make_engine()
    request_id = engine.add_request(prompts[0], GREEDY_32)
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort(request_id)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "make_params",
    [
        lambda: SamplingParams(max_tokens=0),
        lambda: SamplingParams(max_tokens=-3),
        lambda: SamplingParams(temperature=-0.1),
        lambda: SamplingParams(top_p=0.0),
        lambda: SamplingParams(top_p=1.5),
        lambda: SamplingParams(top_k=-1),
        lambda: SamplingParams(stop=("",)),
        lambda: SamplingParams(logprobs=-1),
        lambda: SamplingParams(logprobs=21),
    ],
)
def test_bad_sampling_params_raise_typed_error(make_params):
    with pytest.raises(InvalidRequestError):
        make_params()


def test_bad_prompts_do_not_disturb_running_requests(make_engine, prompts):
    expected = make_engine().generate([prompts[0]], GREEDY_32)[0].token_ids
    engine = make_engine(num_blocks=64)
    request_id = engine.add_request(prompts[0], GREEDY_32)
    seq = engine.requests[request_id].seq
    engine.step()
    bad = [[], [5] * (64 * 16), [10**6], [-1]]  # empty, longer than the cache, out of vocabulary
    for prompt in bad:
        with pytest.raises(InvalidRequestError):
            engine.add_request(prompt, GREEDY_32)
    with pytest.raises(InvalidRequestError):
        engine.encode_prompt("")
    while engine.has_unfinished():
        engine.step()
    assert seq.output_token_ids == expected
    assert_all_blocks_free(engine)
