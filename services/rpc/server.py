"""Start a gRPC server for one or more servicers, the same way for every specserve service.

- Handlers are built from the service descriptors, with a request parser that turns a malformed message
  (invalid UTF-8 in a string field, a truncated buffer) into INVALID_ARGUMENT instead of the INTERNAL a
  failed deserialization gets by default.
- A `SpecserveError` raised by a servicer method ends the call with its status code (`status_for`).
- Standard health checking (`grpc.health.v1`) and server reflection are on every server.
- SIGTERM (or `RpcServer.drain`) marks every service NOT_SERVING, refuses new calls, lets running calls
  finish within `grace` seconds, then stops.
- With `ServerTls` (rpc/tls.py) the port speaks TLS only, optionally requiring client certificates.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specserve.errors import (
    DeadlineExceededError,
    DraftCheckpointError,
    InvalidRequestError,
    ModelLoadError,
    OverloadedError,
    RequestCancelledError,
    SpecserveError,
    UnavailableError,
)
from specserve.rpc.tls import ServerTls

# Requests and responses up to this size are accepted; a bigger prompt is refused by the router itself
# (INVALID_ARGUMENT with the limit), and hidden states of long histories fit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Clients' channels (the SDK's, and the router's to its replicas) take messages of the same size.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would share it silently (the kernel
    # spreading connections over both) instead of failing to bind.
    ("grpc.so_reuseport", 0),
]


def status_for(error: SpecserveError) -> grpc.StatusCode:
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, RequestCancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, (ModelLoadError, DraftCheckpointError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


@dataclass
class MalformedRequest:
    """What the parser hands on instead of a message it could not decode."""

    reason: str


def _parser(message_class: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return MalformedRequest(f"malformed {message_class.DESCRIPTOR.name}: {exc}")

    return parse


def _unary(behavior: Callable) -> Callable:
    @functools.wraps(behavior)
    def call(request, context: grpc.ServicerContext):
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return behavior(request, context)
        except SpecserveError as exc:
            context.abort(status_for(exc), str(exc))

    return call


def _streaming(behavior: Callable) -> Callable:
    @functools.wraps(behavior)
    def call(request, context: grpc.ServicerContext) -> Iterator:
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            yield from behavior(request, context)
        except SpecserveError as exc:
            context.abort(status_for(exc), str(exc))

    return call


def method_handlers(servicer: object, service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """Handlers for every method of `service`, calling the servicer's method of the same name."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        kwargs = {"request_deserializer": _parser(request_class),
                  "response_serializer": response_class.SerializeToString}
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_streaming(behavior), **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(behavior), **kwargs)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class RpcServer:
    """A started gRPC server with health and reflection; `port` is the bound one (0 picks a free one)."""

    def __init__(self, services: list[tuple[object, ServiceDescriptor]], address: str, max_workers: int = 64,
                 tls: ServerTls | None = None) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS)
        for servicer, service in services:
            self.server.add_generic_rpc_handlers((method_handlers(servicer, service),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [service.full_name for _, service in services]
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        try:
            if tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, tls.credentials())
        except RuntimeError:  # grpcio raises where it once returned 0
            raise UnavailableError(f"could not bind {address}: in use, or not an address of this host") from None
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self._names = ["", *names]
        self._stopped = threading.Event()

    def start(self) -> RpcServer:
        self.server.start()
        for name in self._names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def drain(self, grace: float = 10.0) -> None:
        """Stop taking calls, let running ones finish (at most `grace` s), stop."""
        if self._stopped.is_set():
            return
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._stopped.set()

    def handle_sigterm(self, grace: float = 10.0, on_drained: Callable[[], None] | None = None) -> None:
        """Drain on SIGTERM (and SIGINT), then call `on_drained`. Main thread only."""

        def handler(signum, frame) -> None:
            threading.Thread(target=self._drain_then, args=(grace, on_drained), daemon=True).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _drain_then(self, grace: float, on_drained: Callable[[], None] | None) -> None:
        self.drain(grace)
        if on_drained is not None:
            on_drained()

    def wait(self) -> None:
        self._stopped.wait()
