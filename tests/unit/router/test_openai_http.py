"""The OpenAI-compatible HTTP API, through the official `openai` client: an embedded router on the real model
answers as the router itself does (greedy outputs equal), in OpenAI's shapes whole and streamed; bad
requests are 400s naming the field; router errors keep their status codes (a scripted router raises
them); a client that leaves, mid-stream or mid-wait, cancels its request."""

from __future__ import annotations

import http.client
import json
import socket
import time

import openai
import pytest

from specserve.engine.config import CacheConfig, SamplingParams
from specserve.errors import DeadlineExceededError, InvalidRequestError, OverloadedError, UnavailableError
from specserve.router.core import RouterConfig, RouterOutput
from specserve.router.openai_http import start_openai_http
from specserve.router.server import build_embedded_router

COUNTING = "1, 2, 3, 4,"  # greedy continues " 5, 6, 7, ..." and never stops on its own
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def router(model_path):
    # The static speculation budget: the cost budget prices drafts by measured step times, so whether a step
    # speculates would vary between runs, and with it a seeded request's draws and the speculated share of
    # a request (tests below compare runs).
    router = build_embedded_router(str(model_path), "float32", ["ngram"], CacheConfig(block_size=16, num_blocks=64),
                                   RouterConfig(speculation_budget="static"))
    yield router.start()
    router.stop()


@pytest.fixture(scope="module")
def server(router):
    server = start_openai_http(router, "127.0.0.1", 0)
    yield server
    server.shutdown()


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_of(server)


def direct(router, prompt_ids: list[int], **params: object) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) straight from the router."""
    outputs = list(router.submit(prompt_ids, SamplingParams(**params)))
    return "".join(o.text for o in outputs), sum(len(o.token_ids) for o in outputs), outputs[-1].finish_reason


def raw_request(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, answer = response.status, json.loads(response.read())
    connection.close()
    return status, answer


def wait_until_idle(router, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while router.num_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert router.num_active == 0


# ---- answers ----------------------------------------------------------------------------------------

def test_models_and_health(client, server, router):
    assert [m.id for m in client.models.list().data] == [router.model_name]
    assert client.models.retrieve(router.model_name).id == router.model_name
    assert raw_request(server, "GET", "/health") == (200, {"status": "ok"})


def test_chat_completion_is_the_routers_greedy_output(client, router):
    prompt_ids = router.encode(messages=CHAT)
    text, tokens, finish = direct(router, prompt_ids, max_tokens=12, temperature=0.0)
    response = client.chat.completions.create(model=router.model_name, messages=CHAT, max_tokens=12, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), tokens)
    assert response.usage.total_tokens == len(prompt_ids) + tokens


def test_completion_of_text_and_of_token_ids(client, router):
    prompt_ids = router.encode(prompt=COUNTING, raw=True)
    text, tokens, _ = direct(router, prompt_ids, max_tokens=10, temperature=0.0)
    for prompt in (COUNTING, prompt_ids):
        response = client.completions.create(model=router.model_name, prompt=prompt, max_tokens=10, temperature=0)
        assert response.object == "text_completion"
        assert (response.choices[0].text, response.choices[0].finish_reason) == (text, "length")
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), tokens)


def test_streamed_chat_adds_up_to_the_whole_answer(client, router):
    kwargs = dict(model=router.model_name, messages=CHAT, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *text_chunks, finish_chunk, usage_chunk = chunks
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == whole.choices[0].message.content
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in text_chunks)
    assert finish_chunk.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_streamed_completion_ends_with_its_finish_reason(client, router):
    chunks = list(client.completions.create(model=router.model_name, prompt=COUNTING, max_tokens=8, temperature=0,
                                            stream=True))
    whole = client.completions.create(model=router.model_name, prompt=COUNTING, max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "length"]
    assert all(c.usage is None for c in chunks)


def test_stop_string_ends_with_stop(client, router):
    response = client.completions.create(model=router.model_name, prompt=COUNTING, max_tokens=16, temperature=0,
                                         stop=[", 7", "never"])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (" 5, 6", "stop")


def test_top_k_1_and_speculation_off_sample_greedily(client, router):
    greedy = client.completions.create(model=router.model_name, prompt=COUNTING, max_tokens=8, temperature=0)
    sampled = client.completions.create(model=router.model_name, prompt=COUNTING, max_tokens=8, temperature=1.5,
                                        seed=3, extra_body={"top_k": 1, "min_p": 0.0, "speculation": "off"})
    assert sampled.choices[0].text == greedy.choices[0].text


def test_n_choices_of_a_batch_of_prompts(client, router):
    """Two prompts x n=2, greedy: choices 0-1 are the first prompt's router output, 2-3 the second's; the
    usage counts each prompt once and every choice's tokens."""
    prompts = [COUNTING, "A, B, C, D,"]
    answer = client.completions.create(model=router.model_name, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    expected = [direct(router, router.encode(prompt=p, raw=True), max_tokens=6) for p in prompts]
    assert [c.text for c in answer.choices] == [expected[0][0]] * 2 + [expected[1][0]] * 2
    assert answer.usage.prompt_tokens == sum(len(router.encode(prompt=p, raw=True)) for p in prompts)
    assert answer.usage.completion_tokens == 2 * (expected[0][1] + expected[1][1])
    wait_until_idle(router)


def test_seeded_choices_are_reproducible_and_differ(client, router):
    """With a seed, choice i samples as a request of its own with seed + i would."""
    def sample(n: int, seed: int) -> list[str]:
        answer = client.completions.create(model=router.model_name, prompt="Once upon a time", n=n, max_tokens=8,
                                           temperature=1.5, seed=seed)
        return [c.text for c in answer.choices]

    three = sample(3, seed=5)
    assert three == sample(3, seed=5)
    assert three == [sample(1, seed=5 + i)[0] for i in range(3)]
    assert len(set(three)) > 1


def test_streamed_chat_with_n_choices_adds_up_to_each_choice(client, router):
    whole = client.chat.completions.create(model=router.model_name, messages=CHAT, n=2, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=router.model_name, messages=CHAT, n=2, max_tokens=10,
                                            temperature=0, stream=True)
    texts, roles, finishes = ["", ""], [None, None], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index] = roles[choice.index] or choice.delta.role
            finishes[choice.index] = finishes[choice.index] or choice.finish_reason
    assert texts == [c.message.content for c in whole.choices]
    assert roles == ["assistant"] * 2 and finishes == [c.finish_reason for c in whole.choices]
    wait_until_idle(router)


# ---- log probabilities ------------------------------------------------------------------------------

def test_logprobs_of_speculated_tokens_equal_plain_decodings(router):
    """Accepted drafts read their log probabilities from their parents' rows of the verified tree: the values
    plain decoding computes, to float rounding."""
    ids = router.encode(prompt="a b c d e f g a b c d e f g a b c d e f g a b c", raw=True)  # n-gram drafts hit
    runs = {}
    for mode in ("lossless", "off"):
        outputs = list(router.submit(ids, SamplingParams(max_tokens=24, logprobs=2), mode=mode))
        runs[mode] = ([t for o in outputs for t in o.token_ids], [lp for o in outputs for lp in o.logprobs])
        if mode == "lossless":
            assert outputs[-1].spec.accepted >= 8  # most tokens came from tree rows
    (spec_ids, spec_lps), (plain_ids, plain_lps) = runs["lossless"], runs["off"]
    assert spec_ids == plain_ids == [lp.token_id for lp in spec_lps] and len(spec_lps) == 24
    for fast, plain in zip(spec_lps, plain_lps):
        assert fast.top[0][0] == fast.token_id and len(fast.top) == 2  # greedy: the most likely token
        assert fast.logprob == pytest.approx(plain.logprob, abs=1e-4)
        assert [t for t, _ in fast.top] == [t for t, _ in plain.top]
        assert fast.logprob < 0 and fast.top[0][1] >= fast.top[1][1]


def test_chat_and_completion_logprobs_in_openais_shapes(client, router):
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": COUNTING}], max_tokens=12,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert b"".join(bytes(entry.bytes) for entry in content).decode().startswith(chat.choices[0].message.content)
    for entry in content:
        assert [alt.token for alt in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    streamed = client.chat.completions.create(model="m", messages=[{"role": "user", "content": COUNTING}],
                                              max_tokens=12, temperature=0, logprobs=True, stream=True)
    entries = [e for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert all(e.top_logprobs == [] for e in entries)  # top_logprobs unset: 0 alternatives
    completion = client.completions.create(model="m", prompt=COUNTING, max_tokens=12, temperature=0, logprobs=1)
    text, logprobs = completion.choices[0].text, completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == text and len(logprobs.token_logprobs) == 12
    assert [text[offset:] for offset in logprobs.text_offset] == ["".join(logprobs.tokens[i:]) for i in range(12)]
    assert [list(top) for top in logprobs.top_logprobs] == [[token] for token in logprobs.tokens]
    plain = client.completions.create(model="m", prompt=COUNTING, max_tokens=12, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == text


def test_penalties_change_the_answer_and_survive_speculation(client):
    prompt = "a b c d e f g a b c d e f g a b c"
    penalties = {"presence_penalty": 0.6, "frequency_penalty": 0.6}
    texts = {speculation: client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0,
                                                    extra_body={"speculation": speculation, "repetition_penalty": 1.3},
                                                    **penalties).choices[0].text
             for speculation in ("lossless", "off")}
    plain = client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    assert texts["lossless"] == texts["off"] != plain


def test_logit_bias_bans_a_token(client, router):
    first = router.encode(prompt=" 5", raw=True)[0]  # greedy's next token after COUNTING
    plain = client.completions.create(model="m", prompt=COUNTING, max_tokens=2, temperature=0)
    banned = client.completions.create(model="m", prompt=COUNTING, max_tokens=2, temperature=0,
                                       logit_bias={str(first): -100})
    assert plain.choices[0].text.startswith(" 5") and not banned.choices[0].text.startswith(" 5")


# ---- errors -----------------------------------------------------------------------------------------

def create(client: openai.OpenAI, endpoint: str, **overrides: object):
    if endpoint == "chat":
        return client.chat.completions.create(**{"model": "m", "messages": CHAT, "max_tokens": 4, **overrides})
    return client.completions.create(**{"model": "m", "prompt": COUNTING, "max_tokens": 4, **overrides})


@pytest.mark.parametrize("endpoint, fields, param", [
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 65}, "n"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"temperature": "hot"}, "temperature"),
    ("chat", {"top_p": 0}, None),
    ("chat", {"extra_body": {"speculation": "maybe"}}, "speculation"),
    ("chat", {"extra_body": {"drafter": "nope"}}, None),
    ("completion", {"echo": True}, "echo"),
    ("completion", {"logprobs": 21}, "logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("chat", {"presence_penalty": 2.5}, None),
    ("completion", {"frequency_penalty": "high"}, "frequency_penalty"),
    ("completion", {"extra_body": {"repetition_penalty": 0}}, None),
    ("completion", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("completion", {"logit_bias": {"5": "high"}}, "logit_bias"),
    ("completion", {"logit_bias": {"5": 200}}, None),
    ("completion", {"logit_bias": {"999999": 1}}, None),
    ("completion", {"prompt": ["one", 2]}, "prompt"),
    ("completion", {"prompt": []}, "prompt"),
    ("completion", {"prompt": ["one"] * 9, "n": 8}, "n"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"max_tokens": 0}, None),
    ("completion", {"stop": ["", "x"]}, "stop"),
])
def test_bad_request_is_400_naming_the_field(client, router, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, endpoint, **fields)
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["param"] == param
    assert router.num_active == 0


def test_malformed_bodies_and_unknown_paths(server):
    status, answer = raw_request(server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    assert raw_request(server, "POST", "/v1/completions", b"[1]")[0] == 400
    assert raw_request(server, "GET", "/v2/nothing")[0] == 404
    assert raw_request(server, "GET", "/v1/chat/completions")[0] == 405
    status, answer = raw_request(server, "GET", "/v1/models/gpt-9")
    assert (status, answer["error"]["code"]) == (404, "model_not_found")


class ScriptedRouter:
    """Stands in for a Router: submit raises `error`, or (stream_error) returns a handle that yields one
    delta and then raises it, as a deadline passing mid-generation does."""

    model_name, max_total_tokens, verifiers = "scripted", 64, []

    def __init__(self, error: Exception, stream_error: bool = False) -> None:
        self.error, self.stream_error = error, stream_error

    def encode(self, **prompt: object) -> list[int]:
        return [1, 2, 3]

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, **options: object) -> ScriptedRouter:
        if not self.stream_error:
            raise self.error
        self.prompt_token_ids = prompt_token_ids
        return self

    def __iter__(self):
        yield RouterOutput([5], "five")
        raise self.error

    def cancel(self) -> None:
        pass


@pytest.fixture
def scripted():
    """(server over a ScriptedRouter, its client); set `server.router` to the script."""
    server = start_openai_http(ScriptedRouter(RuntimeError()), "127.0.0.1", 0)
    yield server, client_of(server)
    server.shutdown()


@pytest.mark.parametrize("error, status, kind, client_error", [
    (OverloadedError("queue full"), 429, "overloaded_error", openai.RateLimitError),
    (UnavailableError("no verifier"), 503, "unavailable_error", openai.InternalServerError),
    (DeadlineExceededError("too late"), 504, "timeout_error", openai.InternalServerError),
    (InvalidRequestError("too long"), 400, "invalid_request_error", openai.BadRequestError),
    (RuntimeError("bug"), 500, "server_error", openai.InternalServerError),
])
def test_router_errors_keep_their_status(scripted, error, status, kind, client_error):
    server, client = scripted
    server.router = ScriptedRouter(error)
    with pytest.raises(client_error) as caught:
        create(client, "chat")
    assert caught.value.status_code == status and caught.value.body["type"] == kind


def test_error_mid_stream_is_an_error_event(scripted):
    server, client = scripted
    server.router = ScriptedRouter(DeadlineExceededError("ran past its deadline"), stream_error=True)
    stream = create(client, "completion", stream=True)
    assert next(stream).choices[0].text == "five"
    with pytest.raises(openai.APIError, match="ran past its deadline") as caught:
        next(stream)
    assert caught.value.body["type"] == "timeout_error"


# ---- clients that leave -----------------------------------------------------------------------------

def test_leaving_a_stream_cancels_the_request(client, router):
    finished_tokens = router.spec_stats.tokens
    stream = client.completions.create(model=router.model_name, prompt=COUNTING, max_tokens=400, temperature=0,
                                       stream=True)
    assert next(stream).choices[0].text
    assert router.num_active == 1
    stream.close()
    wait_until_idle(router)
    assert router.spec_stats.tokens == finished_tokens  # cancelled, not run to its end


def test_leaving_a_whole_request_cancels_it(server, router):
    finished_tokens = router.spec_stats.tokens
    body = json.dumps({"model": "m", "prompt": COUNTING, "max_tokens": 400, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 5
    while router.num_active == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert router.num_active == 1
    sock.close()
    wait_until_idle(router)
    assert router.spec_stats.tokens == finished_tokens
