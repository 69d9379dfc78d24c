"""OpenAI's completions and chat-completions schema over the router: request bodies in, validated into
`Router.submit` arguments; whole responses, stream chunks and error bodies out. Pure translation: the
HTTP server (openai_http.py) owns sockets and threads.

Accepted beyond OpenAI's fields: `top_k`, `min_p`, `repetition_penalty` (vLLM's), `speculation` (off |
lossless | lossy) and `drafter`.
Log probabilities: `logprobs` (completions: the number of alternatives, 0-20) or `logprobs` + `top_logprobs`
(chat), answered in each API's shape (engine/logprobs.py says what they measure). Fields asking for what the
router cannot do (echo, best_of, tools...) are refused
with 400 rather than silently ignored. Unknown fields are ignored (as vLLM does; OpenAI refuses them) so
that clients sending newer optional fields keep working. `model` is not checked: a router serves one model.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import accumulate

from specserve.engine.config import MAX_TOP_LOGPROBS, SamplingParams
from specserve.engine.logprobs import TokenLogprob
from specserve.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    SpecserveError,
    UnavailableError,
)
from specserve.router.core import SPEC_MODES, Router, RouterOutput

# OpenAI's default max_tokens of /v1/completions; chat completions default to the rest of the context.
COMPLETION_MAX_TOKENS = 16
MAX_CHOICES = 64  # prompts x n of one request: each choice is a request of its own in the router
# Fields this server cannot honour, with the values that ask for nothing and are therefore accepted.
UNSUPPORTED = {
    "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
    "functions": ([],), "response_format": ({"type": "text"},),
}
# Error class -> (HTTP status, OpenAI error type); anything else is a 500 "server_error".
ERROR_STATUS: list[tuple[type[SpecserveError], int, str]] = [
    (InvalidRequestError, 400, "invalid_request_error"),
    (OverloadedError, 429, "overloaded_error"),
    (UnavailableError, 503, "unavailable_error"),
    (DeadlineExceededError, 504, "timeout_error"),
]


class ApiError(Exception):
    """An error answer: HTTP status plus the fields of OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def bad_field(cls, param: str, message: str) -> ApiError:
        return cls(400, message, param=param)

    @classmethod
    def answering(cls, exc: Exception) -> ApiError:
        """The answer to any failure: itself, a SpecserveError's status, else a 500."""
        if isinstance(exc, ApiError):
            return exc
        for error_class, status, type in ERROR_STATUS:
            if isinstance(exc, error_class):
                return cls(status, str(exc), type)
        return cls(500, f"internal error: {exc}", "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class OpenAIRequest:
    """One /v1/completions or /v1/chat/completions body, as the router takes it."""

    chat: bool
    prompts: list[list[int]]  # token ids; a completions request may send a batch of prompts
    params: SamplingParams
    n: int  # choices per prompt
    speculation: str  # "" = the router's default
    drafter: str  # "" = the router's first
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage

    def choices(self) -> list[tuple[list[int], SamplingParams]]:
        """(prompt, sampling) of each choice, in OpenAI's order: choice index = prompt index * n + i. With a
        seed, the i-th choice of a prompt samples with seed + i: n reproducible and different samples."""
        def params(i: int) -> SamplingParams:
            return self.params if self.params.seed is None else replace(self.params, seed=self.params.seed + i)
        return [(prompt, params(i)) for prompt in self.prompts for i in range(self.n)]


def parse_request(body: object, router: Router, chat: bool) -> OpenAIRequest:
    """Validate a request body; raises ApiError (400) naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, accepted in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in accepted:
            raise ApiError.bad_field(name, f"{name} is not supported by this server")
    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError.bad_field("n", f"n must be between 1 and {MAX_CHOICES}, got {n}")
    stream = _get(body, "stream", bool, False)
    stream_options = _get(body, "stream_options", dict, None)
    if stream_options is not None and not stream:
        raise ApiError.bad_field("stream_options", "stream_options is only allowed when stream is true")
    if chat:
        prompts = [_encode(router, "messages", messages=_messages(body.get("messages")))]
        default_max = max(1, router.max_total_tokens - len(prompts[0]))
        max_tokens = _get(body, "max_completion_tokens", int, None)  # OpenAI's newer name
        if max_tokens is None:
            max_tokens = _get(body, "max_tokens", int, default_max)
    else:
        prompts = _completion_prompts(router, body.get("prompt"))
        max_tokens = _get(body, "max_tokens", int, COMPLETION_MAX_TOKENS)
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError.bad_field("n", f"{len(prompts)} prompts x n={n} exceed {MAX_CHOICES} choices per request")
    speculation = _get(body, "speculation", str, "")
    if speculation not in ("", *SPEC_MODES):
        raise ApiError.bad_field("speculation", f"speculation must be one of {', '.join(SPEC_MODES)}")
    return OpenAIRequest(
        chat=chat, prompts=prompts, params=_sampling(body, max_tokens, _num_logprobs(body, chat)), n=n,
        speculation=speculation,
        drafter=_get(body, "drafter", str, ""), stream=stream,
        include_usage=_get(stream_options or {}, "include_usage", bool, False),
    )


def _get(body: dict, name: str, kind: type | tuple[type, ...], default: object) -> object:
    """body[name], type-checked (a bool is not a number here); absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = "a number" if kind == (int, float) else f"of type {getattr(kind, '__name__', kind)}"
        raise ApiError.bad_field(name, f"{name} must be {expected}, got {json_type(value)}")
    return value


def json_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _num_logprobs(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs: completions send the number of alternatives as `logprobs`; chat sends
    `logprobs: true` and the number as `top_logprobs`."""
    if chat:
        top = _get(body, "top_logprobs", int, None)
        if not _get(body, "logprobs", bool, False):
            if top is not None:
                raise ApiError.bad_field("top_logprobs", "top_logprobs needs logprobs set to true")
            return None
        name, num = "top_logprobs", 0 if top is None else top
    else:
        name, num = "logprobs", _get(body, "logprobs", int, None)
        if num is None:
            return None
    if not 0 <= num <= MAX_TOP_LOGPROBS:
        raise ApiError.bad_field(name, f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {num}")
    return num


def _sampling(body: dict, max_tokens: int, logprobs: int | None) -> SamplingParams:
    number = (int, float)
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError.bad_field("stop", "stop must be a non-empty string or a list of them")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(_get(body, "temperature", number, 1.0)),
            top_p=float(_get(body, "top_p", number, 1.0)), top_k=_get(body, "top_k", int, 0),
            min_p=float(_get(body, "min_p", number, 0.0)), seed=_get(body, "seed", int, None), stop=tuple(stop),
            logprobs=logprobs, presence_penalty=float(_get(body, "presence_penalty", number, 0.0)),
            frequency_penalty=float(_get(body, "frequency_penalty", number, 0.0)),
            repetition_penalty=float(_get(body, "repetition_penalty", number, 1.0)),
            logit_bias=_logit_bias(body),
        )
    except InvalidRequestError as exc:  # an out-of-range value; the message names the field
        raise ApiError(400, str(exc)) from None


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as SamplingParams.logit_bias."""
    bias = _get(body, "logit_bias", dict, {})
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and token.lstrip("-").isdigit()
               for token, value in bias.items()):
        raise ApiError.bad_field("logit_bias", "logit_bias maps token ids to numbers")
    return tuple(sorted((int(token), float(value)) for token, value in bias.items()))


def _completion_prompts(router: Router, prompt: object) -> list[list[int]]:
    """A string (tokenized as is, no chat template), a list of token ids, or a batch: a list of either."""
    def is_ids(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str):
        return [_encode(router, "prompt", prompt=prompt, raw=True)]
    if is_ids(prompt) and prompt:
        return [_encode(router, "prompt", prompt_token_ids=prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return [_encode(router, f"prompt[{i}]", **({"prompt": p, "raw": True} if isinstance(p, str) else
                                                  {"prompt_token_ids": p}))
                for i, p in enumerate(prompt)]
    raise ApiError.bad_field("prompt", "prompt must be a string, a list of token ids, or a non-empty list of either")


def _messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError.bad_field("messages", "messages must be a non-empty array")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError.bad_field(f"messages[{i}]", "a message must be an object with role and content")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError.bad_field(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError.bad_field(f"messages[{i}].content", "content must be a string or text parts")
        role = message.get("role")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def _encode(router: Router, param: str, **prompt: object) -> list[int]:
    try:
        return router.encode(**prompt)
    except InvalidRequestError as exc:
        raise ApiError.bad_field(param, str(exc)) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Reply:
    """The response bodies of one request: the whole answer, or its stream chunks in OpenAI's shapes."""

    chat: bool
    model: str
    include_usage: bool = False
    # Set when the request asked for log probabilities: a token id's bytes (Tokenizer.token_bytes).
    token_bytes: Callable[[int], bytes] | None = None
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12))

    def whole(self, outputs: Iterable[tuple[int, RouterOutput]], num_choices: int, prompt_tokens: int) -> dict:
        """`outputs`: (choice index, output) of every choice, in any interleaving."""
        texts: list[list[str]] = [[] for _ in range(num_choices)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]
        finish_reasons: list[str | None] = [None] * num_choices
        completion_tokens = 0
        for index, output in outputs:
            texts[index].append(output.text)
            logprobs[index] += output.logprobs or ()
            completion_tokens += len(output.token_ids)
            finish_reasons[index] = output.finish_reason
        choices = []
        for index, (parts, finish_reason) in enumerate(zip(texts, finish_reasons)):
            text = "".join(parts)
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": index, **content, "logprobs": self._logprobs(logprobs[index], 0),
                            "finish_reason": finish_reason})
        return {**self._envelope("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunks(self, outputs: Iterable[tuple[int, RouterOutput]], num_choices: int,
               prompt_tokens: int) -> Iterator[dict]:
        """A chat stream opens with the role of each choice; text deltas follow, each naming its choice; a
        choice's finish reason comes in a chunk of its own, then (with include_usage) one with no choices
        and the usage."""
        if self.chat:
            for index in range(num_choices):
                yield self._chunk(index, text="", role="assistant")
        completion_tokens = 0
        text_offsets = [0] * num_choices  # completions' text_offset: characters of a choice streamed so far
        for index, output in outputs:
            completion_tokens += len(output.token_ids)
            if output.text or output.logprobs:
                logprobs = self._logprobs(output.logprobs or [], text_offsets[index])
                yield self._chunk(index, text=output.text, logprobs=logprobs)
                text_offsets[index] += len(output.text)
            if output.finished:
                yield self._chunk(index, text=None if self.chat else "", finish_reason=output.finish_reason)
        if self.include_usage:
            yield {**self._envelope(self._chunk_object), "choices": [],
                   "usage": usage(prompt_tokens, completion_tokens)}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, index: int, text: str | None, role: str | None = None,
               finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": role} if role else {}
            choice = {"index": index, "delta": delta | ({"content": text} if text is not None else {})}
        else:
            choice = {"index": index, "text": text}
        chunk = {**self._envelope(self._chunk_object),
                 "choices": [{**choice, "logprobs": logprobs, "finish_reason": finish_reason}]}
        return chunk | {"usage": None} if self.include_usage else chunk

    def _logprobs(self, logprobs: list[TokenLogprob], text_offset: int) -> dict | None:
        """A choice's `logprobs` for these tokens in the API's shape; None when the request asked for none.
        Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: parallel lists, with each
        token's character offset in the choice's text from `text_offset` on."""
        if self.token_bytes is None:
            return None
        if self.chat:
            return {"content": [{**self._token(lp.token_id, lp.logprob),
                                 "top_logprobs": [self._token(t, v) for t, v in lp.top]} for lp in logprobs],
                    "refusal": None}
        tokens = [self._text(lp.token_id) for lp in logprobs]
        offsets = list(accumulate((len(t) for t in tokens), initial=text_offset))[: len(tokens)]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._text(t): v for t, v in lp.top} for lp in logprobs], "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        raw = self.token_bytes(token_id)
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def _text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode(errors="replace")

    def _envelope(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}
