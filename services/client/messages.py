"""What the client sends and gets back: keyword options -> GenerateRequest, and router messages -> plain
dataclasses and dicts, so callers never handle protobuf. Shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

from specserve.engine.config import SamplingParams
from specserve.engine.logprobs import TokenLogprob
from specserve.errors import InvalidRequestError
from specserve.rpc.logprobs import logprobs_from_proto
from specserve.v1 import common_pb2, router_pb2

SPEC_MODES = {
    "default": common_pb2.SPEC_MODE_UNSPECIFIED,  # the router's choice
    "off": common_pb2.SPEC_MODE_OFF,
    "lossless": common_pb2.SPEC_MODE_LOSSLESS,
    "lossy": common_pb2.SPEC_MODE_LOSSY,
}
LOSSY_FIELDS = ("top_k", "min_ratio", "budget")


class GenerateOptions(TypedDict, total=False):
    """The keyword options of `generate` and `stream`; `generate_request` documents them and their defaults."""

    messages: list[dict[str, str]] | None
    prompt_token_ids: list[int] | None
    raw: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[int, float] | None
    speculation: str
    lossy: dict[str, float] | None
    drafter: str
    cache_salt: str


def generate_request(
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    prompt_token_ids: list[int] | None = None,
    raw: bool = False,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    speculation: str = "default",
    lossy: dict[str, float] | None = None,
    drafter: str = "",
    cache_salt: str = "",
) -> router_pb2.GenerateRequest:
    """Exactly one input: `prompt` (chat template applied unless `raw`), `messages` ([{"role", "content"}])
    or `prompt_token_ids`. Sampling: temperature 0 is greedy; top_k 0 and min_p 0 are off. `logprobs`: None,
    or each generated token's log probability plus that many most likely alternatives (0-20). Penalties:
    `presence_penalty` and `frequency_penalty` (OpenAI's, in [-2, 2]) and `repetition_penalty` (> 0, 1 =
    off) as SamplingParams documents them; `logit_bias` {token id: bias in [-100, 100]}. `speculation`:
    "default" (the router's), "off", "lossless" or "lossy" with `lossy` = {top_k, min_ratio, budget}
    (missing keys take the server's defaults). `drafter`: a name from `info()["drafters"]`, "" = default.
    `cache_salt`: prefix-cache blocks are shared only between requests with the same salt.

    Sampling values are checked here, with the server's rules: on the wire 0 means "default", so a 0
    max_tokens or top_p must not slip through as one.
    """
    request = router_pb2.GenerateRequest(raw=raw, drafter=drafter, cache_salt=cache_salt)
    _set_input(request, prompt, messages, prompt_token_ids)
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "min_p": min_p, "seed": seed, "stop": tuple(stop), "stop_token_ids": tuple(stop_token_ids),
                "ignore_eos": ignore_eos, "logprobs": logprobs, "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty, "repetition_penalty": repetition_penalty}
    SamplingParams(**sampling, logit_bias=tuple((logit_bias or {}).items()))
    if seed is not None and seed < 0:
        raise InvalidRequestError(f"seed must be >= 0, got {seed}")
    request.sampling.CopyFrom(common_pb2.SamplingParams(**sampling, logit_bias=logit_bias or {}))
    if speculation not in SPEC_MODES:
        raise InvalidRequestError(f"unknown speculation {speculation!r}; expected one of {', '.join(SPEC_MODES)}")
    request.speculation = SPEC_MODES[speculation]
    if lossy is not None:
        if speculation != "lossy":
            raise InvalidRequestError(f"lossy parameters need speculation='lossy', got {speculation!r}")
        unknown = sorted(set(lossy) - set(LOSSY_FIELDS))
        if unknown:
            raise InvalidRequestError(f"unknown lossy parameters {unknown}; expected {', '.join(LOSSY_FIELDS)}")
        request.lossy.CopyFrom(common_pb2.LossyParams(**lossy))
    return request


def _set_input(request: router_pb2.GenerateRequest, prompt: str | None, messages: list[dict[str, str]] | None,
               prompt_token_ids: list[int] | None) -> None:
    given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                      ("prompt_token_ids", prompt_token_ids)) if value is not None]
    if len(given) != 1:
        raise InvalidRequestError(f"give exactly one of prompt, messages, prompt_token_ids; got {given or 'none'}")
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        try:
            chat = [router_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        except (KeyError, TypeError):
            raise InvalidRequestError("each message is a dict with 'role' and 'content'") from None
        request.messages.messages.extend(chat)
    else:
        request.prompt_token_ids.ids.extend(prompt_token_ids)


@dataclass
class Generation:
    """A finished request."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]  # the prompt as the model saw it (chat template applied)
    finish_reason: str  # "stop" (EOS, a stop token or string) or "length"
    spec: dict  # speculation counters, the keys of engine SpecStats.as_dict()
    usage: dict  # prompt_tokens, completion_tokens
    seconds: float  # server wall time from admission to the last token
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them


@dataclass
class Chunk:
    """The tokens accepted since the previous chunk; the last one has `finished` set."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # on the last chunk
    prompt_token_ids: list[int]  # on the first chunk, else empty
    spec: dict | None  # on the last chunk, as in Generation
    usage: dict | None  # on the last chunk
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them


def generation_from_proto(msg: router_pb2.GenerateResponse) -> Generation:
    token_ids = list(msg.token_ids)
    return Generation(msg.text, token_ids, list(msg.prompt_token_ids), msg.finish_reason,
                      spec_from_proto(msg.spec), usage_from_proto(msg.usage), msg.seconds,
                      logprobs_from_proto(msg.logprobs, token_ids) if msg.HasField("logprobs") else None)


def chunk_from_proto(msg: router_pb2.TokenChunk) -> Chunk:
    token_ids = list(msg.token_ids)
    return Chunk(token_ids, msg.text, msg.finished, msg.finish_reason or None, list(msg.prompt_token_ids),
                 spec_from_proto(msg.spec) if msg.HasField("spec") else None,
                 usage_from_proto(msg.usage) if msg.HasField("usage") else None,
                 logprobs_from_proto(msg.logprobs, token_ids) if msg.HasField("logprobs") else None)


def spec_from_proto(msg: common_pb2.SpecStats) -> dict:
    """The keys of engine SpecStats.as_dict(), so local and remote summaries read alike (the wire's `tokens`
    is left out: usage counts the completion)."""
    return {"forwards": msg.forwards, "verify_steps": msg.verify_steps, "drafted": msg.drafted,
            "accepted": msg.accepted, "mean_accepted_len": msg.mean_accepted_len,
            "acceptance_by_depth": list(msg.acceptance_by_depth)}


def usage_from_proto(msg: router_pb2.Usage) -> dict:
    return {"prompt_tokens": msg.prompt_tokens, "completion_tokens": msg.completion_tokens}


def info_from_proto(msg: router_pb2.RouterInfo) -> dict:
    return {"model": msg.model, "drafters": list(msg.drafters), "max_total_tokens": msg.max_total_tokens,
            "num_verifiers": msg.num_verifiers, "num_drafters": msg.num_drafters}
