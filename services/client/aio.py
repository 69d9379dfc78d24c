"""asyncio client of the Router service (grpc.aio); the same calls as the blocking `Client`, awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
from specserve.rpc.tls import ClientTls, open_aio_channel
from specserve.v1 import router_pb2, router_pb2_grpc


class AsyncClient:
    """`async with AsyncClient("host:port") as client: print((await client.generate("Hi")).text)`.

    Create it inside the event loop that uses it (grpc.aio binds the channel to that loop). `timeout` and
    `tls` as in `Client`.
    """

    def __init__(self, target: str, timeout: float | None = None, tls: ClientTls | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = open_aio_channel(target, tls, CHANNEL_OPTIONS)
        self._router = router_pb2_grpc.RouterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **options: Unpack[GenerateOptions]) -> Generation:
        request = generate_request(prompt, **options)
        with rpc_errors():
            return generation_from_proto(await self._router.Generate(request, timeout=timeout or self.timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **options: Unpack[GenerateOptions]) -> AsyncIterator[Chunk]:
        """`async for chunk in client.stream(...)`. The request is checked now; cancelling the consuming task
        or closing the iterator (`aclose`, or `contextlib.aclosing` around an early `break`) cancels the call
        on the server."""
        request = generate_request(prompt, **options)
        return _chunks(self._router.GenerateStream(request, timeout=timeout or self.timeout))

    async def info(self) -> dict:
        with rpc_errors():
            return info_from_proto(await self._router.Info(router_pb2.RouterInfoRequest(), timeout=self.timeout))

    async def health(self) -> bool:
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


async def _chunks(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[Chunk]:
    try:
        with rpc_errors():
            async for message in call:
                yield chunk_from_proto(message)
    finally:
        call.cancel()  # a no-op once the last chunk came; else the server stops generating
