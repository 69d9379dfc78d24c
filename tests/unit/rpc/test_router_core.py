"""The router's batching loop over in-process replicas (the embedded mode) on the real model: greedy
output equals the engine's for every mode and drafter; cancellation, deadlines and a full queue end
requests cleanly and free their KV; a verifier that fails mid-generation costs a re-prefill on another
replica, never a token; at high load the step calls no drafter."""

from __future__ import annotations

import copy
import threading
import time

import grpc
import pytest
import torch

from specserve.drafter.servicer import DrafterServicer
from specserve.drafters import build_drafter
from specserve.engine.acceptance import LossyConfig
from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams, SpecConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import DeadlineExceededError, InvalidRequestError, OverloadedError, RequestCancelledError
from specserve.learned.checkpoint import target_fingerprint
from specserve.router.backends import InProcessStub, Replica
from specserve.router.core import Router, RouterConfig
from specserve.router.server import embedded_router
from specserve.verifier.core import VerifierCore
from specserve.verifier.servicer import VerifierServicer

CACHE = CacheConfig(num_blocks=96, block_size=16)


@pytest.fixture(scope="module")
def prompts(spec_bench_prompts) -> list[str]:
    return [spec_bench_prompts[i] for i in (0, 15, 30, 45, 60, 75)]


@pytest.fixture(scope="module")
def engine(llama_model, tokenizer) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path="unused", cache=CacheConfig(num_blocks=256)), llama_model, tokenizer)


def tokens(handle) -> list[int]:
    return [t for output in handle for t in output.token_ids]


def free_blocks(router: Router) -> list[int]:
    return [v.stub.Info(None).free_blocks for v in router.verifiers]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_concurrent_requests_of_every_mode_equal_the_engine(llama_model, tokenizer, engine, prompts) -> None:
    # Static budget: every speculating request drafts, whatever the cost model would decide.
    router = embedded_router(llama_model, tokenizer, "float32", ["ngram", "early-exit"], CACHE,
                             RouterConfig(speculation_budget="static")).start()
    try:
        params = SamplingParams(max_tokens=32)
        ids = [router.encode(p) for p in prompts]
        expected = [c.token_ids for c in engine.generate(ids, params)]
        modes = [("off", ""), ("lossless", ""), ("lossless", "early-exit"), ("", "ngram"), ("off", "early-exit"), ("", "")]
        handles = [router.submit(i, params, mode=m, drafter=d) for i, (m, d) in zip(ids, modes)]
        assert [tokens(h) for h in handles] == expected
        assert router.spec_stats.verify_steps > 0  # speculation ran
        wait_until(lambda: free_blocks(router) == [CACHE.num_blocks])
    finally:
        router.stop()


def test_stop_strings_and_seeded_sampling_match_the_engine(llama_model, tokenizer, engine, prompts) -> None:
    router = embedded_router(llama_model, tokenizer, "float32", ["ngram"], CACHE).start()
    try:
        ids = router.encode(prompts[1])
        (plain,) = engine.generate([ids], SamplingParams(max_tokens=48))
        stop = SamplingParams(max_tokens=48, stop=(plain.text[20:24],))  # hit mid-way, maybe mid-token
        sampled = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
        (want_stop,) = engine.generate([ids], stop)
        got = list(router.submit(ids, stop))
        assert [t for o in got for t in o.token_ids] == want_stop.token_ids
        assert "".join(o.text for o in got) == want_stop.text == plain.text[:20]
        assert got[-1].finish_reason == "stop"
        first, second = tokens(router.submit(ids, sampled)), tokens(router.submit(ids, sampled))
        assert first == second and len(first) == 24
    finally:
        router.stop()


def test_cancel_deadline_and_full_queue(llama_model, tokenizer, prompts) -> None:
    config = RouterConfig(max_num_seqs=1, max_queue=1)
    router = embedded_router(llama_model, tokenizer, "float32", ["ngram"], CACHE, config).start()
    try:
        ids = router.encode(prompts[2])
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        running = router.submit(ids, long)
        outputs = iter(running)
        next(outputs)  # it is decoding
        queued = router.submit(ids, long)  # fills the queue of 1 (max_num_seqs=1 keeps it waiting)
        with pytest.raises(OverloadedError):
            router.submit(ids, long)
        running.cancel()
        with pytest.raises(RequestCancelledError):
            list(outputs)
        queued.cancel()
        with pytest.raises(RequestCancelledError):
            list(queued)
        wait_until(lambda: router.num_active == 0 and free_blocks(router) == [CACHE.num_blocks])
        with pytest.raises(DeadlineExceededError):
            list(router.submit(ids, long, timeout=0.3))
        wait_until(lambda: free_blocks(router) == [CACHE.num_blocks])
    finally:
        router.stop()


def test_bad_requests_are_refused(llama_model, tokenizer) -> None:
    router = embedded_router(llama_model, tokenizer, "float32", ["ngram"], CACHE)
    params = SamplingParams(max_tokens=4)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        router.encode("")
    with pytest.raises(InvalidRequestError, match="unknown drafter"):
        router.submit([1, 2, 3], params, drafter="medusa")
    with pytest.raises(InvalidRequestError, match="token ids"):
        router.submit([1, 2, llama_model.config.vocab_size], params)
    with pytest.raises(InvalidRequestError, match="context"):
        router.submit([1] * router.max_total_tokens, params)
    with pytest.raises(InvalidRequestError, match="role"):
        router.encode(messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="characters"):
        router.encode("x" * (router.config.max_prompt_chars + 1))


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "replica went away"


class _DyingStub(InProcessStub):
    """A verifier that answers `calls` Verify calls, then is gone for good (state lost)."""

    def __init__(self, servicer: VerifierServicer, calls: int) -> None:
        super().__init__(servicer)
        self.calls_left = calls

    def __getattr__(self, name: str):
        method = super().__getattr__(name)
        if name not in ("Verify", "Release"):
            return method

        def call(request, timeout=None):
            if self.calls_left <= 0:
                raise _Unavailable()
            self.calls_left -= name == "Verify"
            return method(request, timeout)

        return call


def test_a_failed_verifier_costs_a_reprefill_not_a_token(llama_model, tokenizer, engine, prompts) -> None:
    fingerprint = target_fingerprint(llama_model)
    servicers = [VerifierServicer(VerifierCore(llama_model, CACHE), fingerprint, "float32") for _ in range(2)]
    dying = _DyingStub(servicers[0], calls=6)
    verifiers = [Replica("dying", dying), Replica("healthy", InProcessStub(servicers[1]))]
    drafter = build_drafter(SpecConfig(method="ngram"), llama_model, tokenizer)
    drafters = {"ngram": [Replica("ngram", InProcessStub(DrafterServicer(drafter, fingerprint)))]}
    router = Router(tokenizer, verifiers, drafters, RouterConfig(affinity_slack=0)).start()
    try:
        # Penalties: the rebuilt sequence's verifier must count what was generated before the failure.
        params = SamplingParams(max_tokens=40, ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.5)
        ids = [router.encode(p) for p in prompts[:4]]
        expected = [c.token_ids for c in engine.generate(ids, params)]
        handles = [router.submit(i, params) for i in ids]
        assert [tokens(h) for h in handles] == expected
        assert dying.calls_left == 0  # the first replica did serve, then failed mid-generation
        wait_until(lambda: servicers[1].core.occupancy()[1] == 0)  # releases are sent without waiting
    finally:
        router.stop()


def test_a_seeded_request_samples_the_same_tokens_across_a_failover(llama_model, tokenizer, engine, prompts) -> None:
    """A seeded request's draws are keyed by its seed and the position being decided, not by how many
    draws a replica made before: the replica that takes over after a failure continues the same text."""
    fingerprint = target_fingerprint(llama_model)
    servicers = [VerifierServicer(VerifierCore(llama_model, CACHE), fingerprint, "float32") for _ in range(2)]
    dying = _DyingStub(servicers[0], calls=6)
    verifiers = [Replica("dying", dying), Replica("healthy", InProcessStub(servicers[1]))]
    router = Router(tokenizer, verifiers, {}, RouterConfig(affinity_slack=0)).start()
    try:
        params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, seed=11)
        ids = [router.encode(p) for p in prompts[:2]]
        expected = [c.token_ids for c in engine.generate(ids, params)]
        handles = [router.submit(i, params, mode="off") for i in ids]
        assert [tokens(h) for h in handles] == expected
        assert dying.calls_left == 0  # the failure happened mid-generation
    finally:
        router.stop()


class _CountingStub(InProcessStub):
    def __init__(self, servicer: object) -> None:
        super().__init__(servicer)
        self.proposes = 0

    def __getattr__(self, name: str):
        if name == "Propose":
            self.proposes += 1
        return super().__getattr__(name)


class _HangingStub(InProcessStub):
    """A verifier whose Verify calls from the `hang_at`-th on block until `release` is set, or for 20 s
    (a hung, not dead, replica)."""

    def __init__(self, servicer: VerifierServicer, hang_at: int) -> None:
        super().__init__(servicer)
        self.calls, self.hang_at, self.release = 0, hang_at, threading.Event()

    def __getattr__(self, name: str):
        method = super().__getattr__(name)
        if name != "Verify":
            return method

        def call(request, timeout=None):
            self.calls += 1
            if self.calls >= self.hang_at:
                self.release.wait(20)
            return method(request, timeout)
        return call


@pytest.mark.parametrize("mode", ["lossless", "off"])
def test_a_hung_verifier_costs_a_reprefill_not_a_stall(llama_model, tokenizer, engine, prompts, mode) -> None:
    """A replica that stops answering decode steps (the call never returns) is given hang_factor x the
    predicted step time, at least hang_floor_s, not the 30 s RPC timeout; its sequences go on elsewhere.
    "off": plain decoding, one sequence per replica, so the step-cost fit never exists (rows never vary
    apart from sequences) and the slowest decode forward seen stands in for the prediction."""
    fingerprint = target_fingerprint(llama_model)
    servicers = [VerifierServicer(VerifierCore(llama_model, CACHE), fingerprint, "float32") for _ in range(2)]
    hanging = _HangingStub(servicers[0], hang_at=16)
    drafter = build_drafter(SpecConfig(method="ngram"), llama_model, tokenizer)
    drafters = {"ngram": [Replica("ngram", InProcessStub(DrafterServicer(drafter, fingerprint)))]}
    router = Router(tokenizer, [Replica("hanging", hanging), Replica("healthy", InProcessStub(servicers[1]))],
                    drafters, RouterConfig(affinity_slack=0, speculation_budget="static", hang_floor_s=0.5)).start()
    watchdog = threading.Timer(15, hanging.release.set)  # a failure costs 15 s, not 20 s per hung call
    try:
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        ids = [router.encode(p) for p in prompts[:2]]
        expected = [c.token_ids for c in engine.generate(ids, params)]
        start = time.monotonic()
        watchdog.start()
        handles = [router.submit(i, params, mode=mode) for i in ids]
        assert [tokens(h) for h in handles] == expected
        assert hanging.calls >= hanging.hang_at  # it did hang mid-generation
        if mode == "off":
            assert router.step_cost.coef is None  # the deadline came from the no-fit stand-in
        assert time.monotonic() - start < 15  # not the 20 s hang
    finally:
        watchdog.cancel()
        hanging.release.set()
        router.stop()


class _RecordingStub(InProcessStub):
    """Keeps every (item, result) pair of the `method` calls that went through it (Verify: VerifyItem and
    VerifyResult; Propose: DraftItem and DraftTree)."""

    def __init__(self, servicer: object, method: str = "Verify") -> None:
        super().__init__(servicer)
        self.method, self.pairs = method, []

    def __getattr__(self, name: str):
        method = super().__getattr__(name)
        if name != self.method:
            return method

        def call(request, timeout=None):
            response = method(request, timeout)
            results = response.results if name == "Verify" else response.trees
            self.pairs += list(zip(request.items, results))
            return response
        return call


def test_a_lossy_request_keeps_its_budget_across_a_failover(llama_model, tokenizer, engine, prompts) -> None:
    """The verifier that rebuilds a lossy sequence goes on with what is left of its divergence budget (the
    router sums what each step spent), not a fresh one; the text equals that of replicas that never fail."""
    fingerprint = target_fingerprint(llama_model)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    lossy = LossyConfig(budget=0.8)
    ids = [tokenizer.render_prompt_ids([{"role": "user", "content": p}]) for p in prompts[:2]]

    def run(calls: int) -> tuple[list[list[int]], _DyingStub, _RecordingStub, _RecordingStub]:
        servicers = [VerifierServicer(VerifierCore(llama_model, CACHE), fingerprint, "float32") for _ in range(2)]
        first, healthy = _RecordingStub(servicers[0]), _RecordingStub(servicers[1])
        dying = _DyingStub(first, calls=calls)
        drafter = build_drafter(SpecConfig(method="ngram"), llama_model, tokenizer)
        drafters = {"ngram": [Replica("ngram", InProcessStub(DrafterServicer(drafter, fingerprint)))]}
        router = Router(tokenizer, [Replica("dying", dying), Replica("healthy", healthy)], drafters,
                        RouterConfig(affinity_slack=0, speculation_budget="static")).start()
        try:
            handles = [router.submit(i, params, mode="lossy", lossy=lossy) for i in ids]
            return [tokens(h) for h in handles], dying, first, healthy
        finally:
            router.stop()

    expected, *_ = run(calls=10**6)
    assert expected != [c.token_ids for c in engine.generate(ids, params)]  # relaxations happened
    failed_over, dying, first, healthy = run(calls=12)  # after each request spent most of its budget
    assert dying.calls_left == 0 and failed_over == expected
    longest_prompt = max(map(len, ids))
    rebuilt = [item for item, _ in healthy.pairs if item.position == 0 and len(item.new_token_ids) > longest_prompt]
    assert len(rebuilt) == 1
    spent_before = sum(r.lossy_spent for i, r in first.pairs if i.seq_id == rebuilt[0].seq_id)
    assert spent_before > 0 and rebuilt[0].lossy.budget == pytest.approx(lossy.budget - spent_before)


def test_at_high_load_the_step_calls_no_drafter(llama_model, tokenizer, prompts) -> None:
    """With max_draft_tokens_per_step=2 and 3 speculating sequences each budget is 0: no Propose at all
    while all three decode; once one finishes, drafting resumes for the other two."""
    fingerprint = target_fingerprint(llama_model)
    drafter = build_drafter(SpecConfig(method="ngram"), llama_model, tokenizer)
    counting = _CountingStub(DrafterServicer(drafter, fingerprint))
    core = VerifierCore(llama_model, CACHE)
    router = Router(tokenizer, [Replica("v", InProcessStub(VerifierServicer(core, fingerprint, "float32")))],
                    {"ngram": [Replica("d", counting)]},
                    RouterConfig(max_draft_tokens_per_step=2, speculation_budget="static"))
    ids = [router.encode(p) for p in prompts[:3]]
    handles = [router.submit(i, SamplingParams(max_tokens=n, ignore_eos=True)) for i, n in zip(ids, (6, 30, 30))]
    steps_with_three = 0
    while router.waiting or router.running:
        with router._cond:
            router._admit()
        decoding = sum(r.decoding for r in router.running)
        before = counting.proposes
        router.step()
        router._flush_releases()
        if decoding == 3:
            steps_with_three += 1
            assert counting.proposes == before
    assert steps_with_three >= 3
    assert counting.proposes > 0  # two sequences left: budget 1 each
    for handle in handles:
        assert tokens(handle)


class _RecordingDrafter:
    """A feature drafter (a random EAGLE head) that records the hidden states it is handed, by history
    length."""

    name = "eagle"
    needs_hidden = True

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seen: dict[int, torch.Tensor] = {}

    def propose(self, requests):
        for r in requests:
            self.seen[len(r.token_ids)] = r.hidden_states.clone()
        return self.inner.propose(requests)

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)


def test_feature_drafters_get_the_engines_hidden_states(llama_model, tokenizer, prompts) -> None:
    """The router rebuilds each sequence's hidden states from what Verify returns (over the wire in the
    distributed mode) and sends each drafter replica only the rows it has not had; the drafter must see
    what the engine hands it from its own cache."""
    from specserve.drafters.eagle import EagleDrafter
    from specserve.learned.eagle_head import new_eagle_head

    torch.manual_seed(0)
    head = new_eagle_head(llama_model, torch.arange(2048))
    twin = copy.deepcopy(head)  # EagleDrafter packs its head in place: copy first
    in_engine, in_router = _RecordingDrafter(EagleDrafter(head)), _RecordingDrafter(EagleDrafter(twin))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    # The same static budget on both sides, so both call the drafter at the same history lengths.
    spec = SpecConfig(method="eagle", num_draft_tokens=8, speculation_budget="static")
    engine = LLMEngine(EngineConfig(model_path="unused", cache=CACHE, spec=spec), llama_model, tokenizer,
                       drafter=in_engine)
    ids = engine.encode_prompt(prompts[3])
    (expected,) = engine.generate([ids], params)

    fingerprint = target_fingerprint(llama_model)
    core = VerifierCore(llama_model, CACHE, keep_hidden=True)
    drafter_stub = _RecordingStub(DrafterServicer(in_router, fingerprint), method="Propose")
    router = Router(tokenizer, [Replica("v", InProcessStub(VerifierServicer(core, fingerprint, "float32")))],
                    {"eagle": [Replica("d", drafter_stub)]},
                    RouterConfig(speculation_budget="static", num_draft_tokens=8)).start()
    try:
        assert tokens(router.submit(ids, params)) == expected.token_ids
    finally:
        router.stop()
    offsets = [item.hidden_offset for item, _ in drafter_stub.pairs]
    assert offsets[0] == 0 and all(o > 0 for o in offsets[1:])  # after the first call: new rows only
    assert sorted(in_router.seen) == sorted(in_engine.seen) and len(in_engine.seen) >= 3
    for length, hidden in in_engine.seen.items():
        assert hidden.shape == (length - 1, llama_model.config.hidden_size)
        torch.testing.assert_close(in_router.seen[length], hidden, rtol=1e-4, atol=1e-4)


def test_drafts_made_ahead_are_used_and_change_no_token(llama_model, tokenizer, engine) -> None:
    """A text the model copies: ngram's first path is often accepted whole, so the draft asked for during
    that verify guessed the history right and the next step needs no Propose round for the request.
    Output stays the engine's greedy output with drafting ahead on and off."""
    fingerprint = target_fingerprint(llama_model)
    text = "one two three four five six seven eight nine ten " * 4
    params = SamplingParams(max_tokens=48)
    sync_proposes = {}
    for ahead in (True, False):
        drafter = build_drafter(SpecConfig(method="ngram"), llama_model, tokenizer)
        counting = _CountingStub(DrafterServicer(drafter, fingerprint))
        verifier = InProcessStub(VerifierServicer(VerifierCore(llama_model, CACHE), fingerprint, "float32"))
        router = Router(tokenizer, [Replica("v", verifier)], {"ngram": [Replica("d", counting)]},
                        RouterConfig(speculation_budget="static", draft_ahead=ahead)).start()
        try:
            ids = router.encode(f"Repeat this text exactly: {text}")
            expected = engine.generate([ids], params)[0].token_ids
            assert tokens(router.submit(ids, params)) == expected
            assert (router.ahead.used > 0) == ahead and router.ahead.used <= router.ahead.sent
            sync_proposes[ahead] = counting.proposes - router.ahead.sent  # one request: one call per send
        finally:
            router.stop()
    assert sync_proposes[True] < sync_proposes[False]
