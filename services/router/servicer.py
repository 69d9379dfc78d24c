"""specserve.v1.Router over a `Router`: request messages in, token chunks out. A client that cancels (or
whose deadline passes) cancels the request, which frees its KV at the next step."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from specserve.errors import InvalidRequestError
from specserve.router.core import RequestHandle, Router, RouterOutput
from specserve.rpc import convert
from specserve.rpc.logprobs import logprobs_to_proto
from specserve.v1 import common_pb2, router_pb2

_MODES = {
    common_pb2.SPEC_MODE_UNSPECIFIED: "",
    common_pb2.SPEC_MODE_OFF: "off",
    common_pb2.SPEC_MODE_LOSSLESS: "lossless",
    common_pb2.SPEC_MODE_LOSSY: "lossy",
}


class RouterServicer:
    def __init__(self, router: Router) -> None:
        self.router = router

    def Generate(self, request: router_pb2.GenerateRequest, context: grpc.ServicerContext | None):
        handle = self._submit(request, context)
        outputs = list(handle)
        last = outputs[-1]
        token_ids = [t for o in outputs for t in o.token_ids]
        response = router_pb2.GenerateResponse(
            text="".join(o.text for o in outputs), token_ids=token_ids,
            prompt_token_ids=handle.prompt_token_ids, finish_reason=last.finish_reason or "",
            spec=convert.spec_stats_to_proto(last.spec), seconds=last.seconds,
            usage=router_pb2.Usage(prompt_tokens=len(handle.prompt_token_ids), completion_tokens=len(token_ids)),
        )
        if last.logprobs is not None:
            response.logprobs.CopyFrom(logprobs_to_proto([lp for o in outputs for lp in o.logprobs]))
        return response

    def GenerateStream(self, request: router_pb2.GenerateRequest,
                       context: grpc.ServicerContext | None) -> Iterator[router_pb2.TokenChunk]:
        handle = self._submit(request, context)
        completion_tokens = 0
        for output in handle:
            completion_tokens += len(output.token_ids)
            yield self._chunk(output, len(handle.prompt_token_ids), completion_tokens)

    def Info(self, request: router_pb2.RouterInfoRequest, context: grpc.ServicerContext | None):
        r = self.router
        return router_pb2.RouterInfo(
            model=r.model_name, drafters=list(r.drafters), max_total_tokens=r.max_total_tokens,
            num_verifiers=len(r.verifiers), num_drafters=sum(len(v) for v in r.drafters.values()),
        )

    def _submit(self, request: router_pb2.GenerateRequest, context: grpc.ServicerContext | None) -> RequestHandle:
        r = self.router
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidRequestError("a request needs a prompt, messages or prompt_token_ids")
        prompt_ids = r.encode(
            prompt=request.prompt if which == "prompt" else None,
            messages=[{"role": m.role, "content": m.content} for m in request.messages.messages]
            if which == "messages" else None,
            prompt_token_ids=list(request.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
            raw=request.raw,
        )
        if request.sampling.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be > 0, got {request.sampling.max_tokens}")
        params = convert.sampling_from_proto(request.sampling)
        if request.speculation not in _MODES:
            raise InvalidRequestError(f"unknown speculation mode {request.speculation}")
        lossy = convert.lossy_from_proto(request.lossy) if request.HasField("lossy") else None
        timeout = context.time_remaining() if context is not None else None
        handle = r.submit(prompt_ids, params, mode=_MODES[request.speculation], drafter=request.drafter,
                          lossy=lossy, timeout=timeout)
        if context is not None:
            context.add_callback(handle.cancel)  # runs on cancellation and on completion (then a no-op)
        return handle

    @staticmethod
    def _chunk(output: RouterOutput, prompt_tokens: int, completion_tokens: int) -> router_pb2.TokenChunk:
        chunk = router_pb2.TokenChunk(token_ids=output.token_ids, text=output.text, finished=output.finished,
                                      finish_reason=output.finish_reason or "")
        if output.prompt_token_ids is not None:
            chunk.prompt_token_ids.extend(output.prompt_token_ids)
        if output.logprobs is not None:
            chunk.logprobs.CopyFrom(logprobs_to_proto(output.logprobs))
        if output.finished:
            chunk.spec.CopyFrom(convert.spec_stats_to_proto(output.spec))
            chunk.usage.CopyFrom(router_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
        return chunk
