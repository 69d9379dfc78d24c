"""Python client SDK of the Router service: `Client` (blocking) and `AsyncClient` (asyncio).

    from specserve.client import Client
    with Client("localhost:50051") as client:
        for chunk in client.stream("Write a haiku.", max_tokens=64, speculation="lossless"):
            print(chunk.text, end="", flush=True)

Failed calls raise specserve.errors types: InvalidRequestError (INVALID_ARGUMENT), OverloadedError
(RESOURCE_EXHAUSTED), UnavailableError (UNAVAILABLE), DeadlineExceededError, RequestCancelledError, and
RpcError for any other status; each carries the status name in `.code`.

Over TLS: `Client("host:50051", tls=ClientTls.from_files(ca="ca.pem"))` (add cert= and key= where the
router requires client certificates).
"""

from specserve.client.aio import AsyncClient
from specserve.client.messages import Chunk, Generation
from specserve.engine.logprobs import TokenLogprob
from specserve.client.sync import Client
from specserve.rpc.tls import ClientTls

__all__ = ["AsyncClient", "Chunk", "Client", "ClientTls", "Generation", "TokenLogprob"]
