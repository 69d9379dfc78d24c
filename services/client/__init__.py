"""Python client SDK of the Router service: `Client` (blocking) and `AsyncClient` (asyncio).

    from specserve.client import Client
    with Client("localhost:50051") as client:
        for chunk in client.stream("Write a haiku.", max_tokens=64, speculation="lossless"):
            print(chunk.text, end="", flush=True)

Failed calls raise specserve.errors types: InvalidRequestError (INVALID_ARGUMENT), OverloadedError
(RESOURCE_EXHAUSTED), UnavailableError (UNAVAILABLE), DeadlineExceededError, RequestCancelledError, and
RpcError for any other status; each carries the status name in `.code`.
"""

from specserve.client.aio import AsyncClient
from specserve.client.messages import Chunk, Generation
from specserve.client.sync import Client

__all__ = ["AsyncClient", "Chunk", "Client", "Generation"]
