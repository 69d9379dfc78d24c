"""How a client talks to a specserve server: channel options, and gRPC status -> typed specserve error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from specserve.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    RequestCancelledError,
    RpcError,
    SpecserveError,
    UnavailableError,
)
from specserve.rpc.server import CHANNEL_OPTIONS

ERRORS: dict[grpc.StatusCode, type[SpecserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def error_from_rpc(error: grpc.RpcError) -> SpecserveError:
    """The typed error for a failed call, with the server's message and `code` set to the status name.
    Codes without their own class become `RpcError`, whose message starts with the code."""
    code = error.code()
    details = error.details() or code.name
    cls = ERRORS.get(code, RpcError)
    exc = cls(details if cls is not RpcError else f"{code.name}: {details}")
    exc.code = code.name
    return exc


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raise a failed call (sync or grpc.aio) as its typed error."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None
