"""Blocking client of the Router service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.client.channel import CHANNEL_OPTIONS, rpc_errors
from specserve.client.messages import (
    Chunk,
    GenerateOptions,
    Generation,
    chunk_from_proto,
    generate_request,
    generation_from_proto,
    info_from_proto,
)
from specserve.rpc.tls import ClientTls, open_channel
from specserve.v1 import router_pb2, router_pb2_grpc


class Client:
    """`with Client("host:port") as client: print(client.generate("Hi").text)`.

    `timeout`: seconds each call may take (a stream: all of it), unless the call passes its own; None =
    no deadline. `tls`: TLS settings (`ClientTls.from_files(ca=...)`), None = plaintext. Failed calls raise
    specserve.errors types (client/channel.py has the mapping).
    """

    def __init__(self, target: str, timeout: float | None = None, tls: ClientTls | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, tls, CHANNEL_OPTIONS)
        self._router = router_pb2_grpc.RouterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **options: Unpack[GenerateOptions]) -> Generation:
        """Run a request to completion; `options` as in messages.generate_request."""
        request = generate_request(prompt, **options)
        with rpc_errors():
            return generation_from_proto(self._router.Generate(request, timeout=timeout or self.timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **options: Unpack[GenerateOptions]) -> Iterator[Chunk]:
        """The request's chunks as they are accepted. The request is checked now; stopping early (closing
        the iterator, or leaving a for loop over it) cancels the call on the server."""
        request = generate_request(prompt, **options)
        return _chunks(self._router.GenerateStream(request, timeout=timeout or self.timeout))

    def info(self) -> dict:
        """The served model, drafter names (the first is the default) and limits."""
        with rpc_errors():
            return info_from_proto(self._router.Info(router_pb2.RouterInfoRequest(), timeout=self.timeout))

    def health(self) -> bool:
        """True when the server reports SERVING (grpc.health.v1, service ""); False if not, or unreachable."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


def _chunks(call: grpc.Call) -> Iterator[Chunk]:
    try:
        with rpc_errors():
            for message in call:
                yield chunk_from_proto(message)
    finally:
        call.cancel()  # a no-op once the last chunk came; else the server stops generating
