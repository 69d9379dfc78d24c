"""Client SDK against a scripted in-test Router: the requests it builds, how it assembles a stream, how each
status code becomes a typed error, and that stopping a stream (sync or asyncio) cancels the server's call."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import aclosing

import grpc
import pytest

from specserve.client import AsyncClient, Chunk, Client
from specserve.client.messages import generate_request
from specserve.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    RequestCancelledError,
    RpcError,
    SpecserveError,
    UnavailableError,
)
from specserve.rpc.server import RpcServer
from specserve.v1 import common_pb2, router_pb2

SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"]
SPEC = common_pb2.SpecStats(forwards=4, tokens=6, verify_steps=3, drafted=9, accepted=2, mean_accepted_len=1.5,
                            acceptance_by_depth=[0.5, 0.25])
USAGE = router_pb2.Usage(prompt_tokens=3, completion_tokens=4)
# The stream every ordinary prompt gets: prompt ids first, counters last.
CHUNKS = [
    router_pb2.TokenChunk(token_ids=[10], text="a", prompt_token_ids=[1, 2, 3]),
    router_pb2.TokenChunk(token_ids=[11, 12], text="bc"),
    router_pb2.TokenChunk(token_ids=[13], text="d", finished=True, finish_reason="stop", spec=SPEC, usage=USAGE),
]

LOGPROBS = common_pb2.TokenLogprobs(
    logprobs=[-0.5, -1.0, -1.5, -0.25],
    top=[common_pb2.TopLogprobs(token_ids=[t, 3], logprobs=[lp, -3.0]) for t, lp in
         [(10, -0.5), (11, -1.0), (12, -1.5), (13, -0.25)]],
)


class ScriptedRouter:
    """Answers by prompt: "fail CODE" aborts with that status, "slow" sleeps 2 s, "forever" streams until
    cancelled, "big" returns 5 MB of text (past gRPC's 4 MB default); anything else gets CHUNKS. Requests
    for log probabilities get LOGPROBS with the tokens (a stream: one chunk), "short logprobs" one too few."""

    def __init__(self) -> None:
        self.requests: list[router_pb2.GenerateRequest] = []
        self.stream_ended = threading.Event()  # set when a "forever" stream's call terminates

    def Generate(self, request: router_pb2.GenerateRequest, context: grpc.ServicerContext):
        self._script(request, context)
        text = "x" * (5 << 20) if request.prompt == "big" else "abcd"
        response = router_pb2.GenerateResponse(text=text, token_ids=[10, 11, 12, 13], prompt_token_ids=[1, 2, 3],
                                               finish_reason="length", spec=SPEC, usage=USAGE, seconds=0.25)
        if request.sampling.HasField("logprobs"):
            response.logprobs.CopyFrom(LOGPROBS)
            if request.prompt == "short logprobs":
                del response.logprobs.logprobs[-1]
        return response

    def GenerateStream(self, request: router_pb2.GenerateRequest, context: grpc.ServicerContext):
        self._script(request, context)
        if request.prompt == "forever":
            context.add_callback(self.stream_ended.set)
            while True:
                yield router_pb2.TokenChunk(token_ids=[7], text="z")
                time.sleep(0.01)
        if request.sampling.HasField("logprobs"):
            yield router_pb2.TokenChunk(token_ids=[10, 11, 12, 13], text="abcd", finished=True, finish_reason="length",
                                        logprobs=LOGPROBS)
            return
        yield from CHUNKS

    def Info(self, request: router_pb2.RouterInfoRequest, context: grpc.ServicerContext):
        return router_pb2.RouterInfo(model="smol", drafters=["ngram", "rest"], max_total_tokens=2048,
                                     num_verifiers=2, num_drafters=3)

    def _script(self, request: router_pb2.GenerateRequest, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        if request.prompt.startswith("fail "):
            context.abort(grpc.StatusCode[request.prompt.split()[1]], f"scripted {request.prompt}")
        if request.prompt == "overloaded":
            raise OverloadedError("queue full, retry later")
        if request.prompt == "slow":
            time.sleep(2)


@pytest.fixture
def router():
    """(scripted servicer, address) of a real server on a free loopback port."""
    servicer = ScriptedRouter()
    server = RpcServer([(servicer, SERVICE)], "127.0.0.1:0").start()
    yield servicer, server.address
    server.drain(0)


@pytest.fixture
def client(router):
    with Client(router[1]) as client:
        yield client


# --- requests -----------------------------------------------------------------------------------

def test_defaults_leave_the_server_its_choices():
    request = generate_request("hi")
    assert request.WhichOneof("input") == "prompt" and not request.raw
    assert request.speculation == common_pb2.SPEC_MODE_UNSPECIFIED and not request.HasField("lossy")
    assert not request.sampling.HasField("seed") and request.drafter == request.cache_salt == ""
    assert not request.sampling.HasField("logprobs")
    assert (request.sampling.max_tokens, request.sampling.top_p) == (256, 1.0)


def test_every_option_reaches_the_server(client, router):
    client.generate("hi", raw=True, max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=0,
                    stop=["\n"], stop_token_ids=[2], ignore_eos=True, speculation="lossy", lossy={"budget": 2.0},
                    drafter="rest", cache_salt="tenant-a", presence_penalty=0.5, frequency_penalty=-0.5,
                    repetition_penalty=1.25, logit_bias={7: -100.0})
    [request] = router[0].requests
    sampling = request.sampling
    assert (request.prompt, request.raw, request.drafter, request.cache_salt) == ("hi", True, "rest", "tenant-a")
    assert (sampling.max_tokens, sampling.top_k, sampling.stop, sampling.stop_token_ids) == (5, 40, ["\n"], [2])
    assert sampling.temperature == pytest.approx(0.5) and sampling.top_p == pytest.approx(0.9)
    assert sampling.min_p == pytest.approx(0.05) and sampling.ignore_eos
    assert sampling.HasField("seed") and sampling.seed == 0  # seed 0 is a seed, not "unset"
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -0.5, 1.25)
    assert dict(sampling.logit_bias) == {7: -100.0}
    assert request.speculation == common_pb2.SPEC_MODE_LOSSY
    assert request.lossy.budget == 2.0 and not request.lossy.HasField("top_k")


def test_messages_and_token_ids_are_inputs_too():
    messages = generate_request(messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
    assert [(m.role, m.content) for m in messages.messages.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert list(generate_request(prompt_token_ids=[5, 6]).prompt_token_ids.ids) == [5, 6]


@pytest.mark.parametrize("speculation,mode", [("off", common_pb2.SPEC_MODE_OFF),
                                              ("lossless", common_pb2.SPEC_MODE_LOSSLESS)])
def test_speculation_modes(speculation, mode):
    assert generate_request("hi", speculation=speculation).speculation == mode


@pytest.mark.parametrize("args,options,needle", [
    ((), {}, "exactly one of prompt, messages, prompt_token_ids; got none"),
    (("hi",), {"prompt_token_ids": [1]}, "got ['prompt', 'prompt_token_ids']"),
    ((), {"messages": [{"role": "user"}]}, "'role' and 'content'"),
    (("hi",), {"max_tokens": 0}, "max_tokens must be > 0"),  # 0 would mean "default" on the wire
    (("hi",), {"top_p": 0.0}, "top_p must be in (0, 1]"),
    (("hi",), {"seed": -1}, "seed must be >= 0"),
    (("hi",), {"logprobs": 21}, "logprobs must be between 0 and 20"),
    (("hi",), {"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    (("hi",), {"speculation": "fast"}, "unknown speculation 'fast'"),
    (("hi",), {"lossy": {"budget": 1.0}}, "lossy parameters need speculation='lossy'"),
    (("hi",), {"speculation": "lossy", "lossy": {"eps": 1.0}}, "unknown lossy parameters ['eps']"),
])
def test_bad_options_fail_before_any_call(client, router, args, options, needle):
    with pytest.raises(InvalidRequestError) as caught:
        client.stream(*args, **options)
    assert needle in str(caught.value)
    assert router[0].requests == []


# --- responses ----------------------------------------------------------------------------------

SPEC_DICT = {"forwards": 4, "verify_steps": 3, "drafted": 9, "accepted": 2, "mean_accepted_len": 1.5,
             "acceptance_by_depth": [0.5, 0.25]}


def test_generate_returns_a_generation(client):
    generation = client.generate("hi")
    assert (generation.text, generation.token_ids, generation.prompt_token_ids) == ("abcd", [10, 11, 12, 13], [1, 2, 3])
    assert (generation.finish_reason, generation.seconds) == ("length", 0.25)
    assert generation.spec == SPEC_DICT
    assert generation.usage == {"prompt_tokens": 3, "completion_tokens": 4}


def test_log_probabilities_come_one_per_token(client, router):
    generation = client.generate("hi", logprobs=0)
    assert router[0].requests[-1].sampling.HasField("logprobs") and router[0].requests[-1].sampling.logprobs == 0
    assert [(lp.token_id, lp.logprob) for lp in generation.logprobs] == [(10, -0.5), (11, -1.0), (12, -1.5),
                                                                          (13, -0.25)]
    assert generation.logprobs[2].top == [(12, -1.5), (3, -3.0)]
    [chunk] = client.stream("hi", logprobs=1)
    assert chunk.logprobs == generation.logprobs
    assert client.generate("hi").logprobs is None
    with pytest.raises(RpcError, match="3 log probabilities for 4 tokens"):
        client.generate("short logprobs", logprobs=1)


def test_stream_yields_chunks_in_order(client):
    assert list(client.stream("hi")) == [
        Chunk([10], "a", False, None, [1, 2, 3], None, None),
        Chunk([11, 12], "bc", False, None, [], None, None),
        Chunk([13], "d", True, "stop", [], SPEC_DICT, {"prompt_tokens": 3, "completion_tokens": 4}),
    ]


def test_messages_past_grpc_default_limit_arrive(client):
    assert len(client.generate("big").text) == 5 << 20


def test_info_and_health(client):
    assert client.info() == {"model": "smol", "drafters": ["ngram", "rest"], "max_total_tokens": 2048,
                             "num_verifiers": 2, "num_drafters": 3}
    assert client.health()


# --- errors -------------------------------------------------------------------------------------

def run_to_end(client: Client, call: str, prompt: str) -> object:
    return client.generate(prompt) if call == "generate" else list(client.stream(prompt))


@pytest.mark.parametrize("code,error", [
    ("INVALID_ARGUMENT", InvalidRequestError),
    ("RESOURCE_EXHAUSTED", OverloadedError),
    ("UNAVAILABLE", UnavailableError),
    ("DEADLINE_EXCEEDED", DeadlineExceededError),
    ("CANCELLED", RequestCancelledError),
    ("FAILED_PRECONDITION", RpcError),
    ("INTERNAL", RpcError),
])
@pytest.mark.parametrize("call", ["generate", "stream"])
def test_status_codes_become_typed_errors(client, code, error, call):
    with pytest.raises(error) as caught:
        run_to_end(client, call, f"fail {code}")
    prefix = f"{code}: " if error is RpcError else ""
    assert str(caught.value) == f"{prefix}scripted fail {code}"
    assert caught.value.code == code


def test_servicer_errors_keep_their_type_end_to_end(client):
    with pytest.raises(OverloadedError, match="queue full, retry later"):
        client.generate("overloaded")


def test_deadline_passes(router):
    with Client(router[1], timeout=0.2) as client, pytest.raises(DeadlineExceededError) as caught:
        client.generate("slow")
    assert caught.value.code == "DEADLINE_EXCEEDED"


def test_unreachable_server():
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % probe.getsockname()[1]
    with Client(address) as client:
        assert not client.health()
        with pytest.raises(UnavailableError) as caught:
            client.generate("hi")
    assert caught.value.code == "UNAVAILABLE" and caught.value.exit_code == 7


def test_leaving_a_stream_early_cancels_the_call(client, router):
    for chunk in client.stream("forever"):
        break
    assert router[0].stream_ended.wait(5)


# --- asyncio ------------------------------------------------------------------------------------

def test_async_client_generates_streams_and_answers(router):
    async def main() -> None:
        async with AsyncClient(router[1]) as client:
            assert (await client.generate("hi")).text == "abcd"
            chunks = [chunk async for chunk in client.stream("hi", max_tokens=4)]
            assert (await client.info())["drafters"] == ["ngram", "rest"]
            assert await client.health()
        assert "".join(c.text for c in chunks) == "abcd" and chunks[-1].finished

    asyncio.run(main())
    assert router[0].requests[1].sampling.max_tokens == 4


@pytest.mark.parametrize("call", ["generate", "stream"])
def test_async_errors_are_typed(router, call):
    async def main() -> None:
        async with AsyncClient(router[1]) as client:
            if call == "generate":
                await client.generate("fail INVALID_ARGUMENT")
            else:
                [chunk async for chunk in client.stream("fail RESOURCE_EXHAUSTED")]

    with pytest.raises(SpecserveError) as caught:
        asyncio.run(main())
    assert caught.value.code == ("INVALID_ARGUMENT" if call == "generate" else "RESOURCE_EXHAUSTED")


def test_cancelling_the_consuming_task_cancels_the_call(router):
    async def main() -> None:
        async with AsyncClient(router[1]) as client:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in client.stream("forever"):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(router[0].stream_ended.wait, 5)

    asyncio.run(main())


def test_closing_an_async_stream_early_cancels_the_call(router):
    async def main() -> None:
        async with AsyncClient(router[1]) as client:
            async with aclosing(client.stream("forever")) as stream:
                async for _ in stream:
                    break
            assert await asyncio.to_thread(router[0].stream_ended.wait, 5)

    asyncio.run(main())
