"""Handles on drafter and verifier replicas: a gRPC stub for a remote one, the servicer itself for one in
this process (embedded mode). Both take the same messages, so the router has one code path."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from specserve.rpc.server import CHANNEL_OPTIONS
from specserve.rpc.tls import ClientTls, open_channel
from specserve.v1 import drafter_pb2_grpc, verifier_pb2_grpc
# A replica that failed a call is skipped for this long, then tried again.
RETRY_AFTER_S = 2.0


class InProcessStub:
    """Calls a servicer's methods directly: `stub.Verify(request, timeout=...)` -> servicer.Verify(request, None)."""

    def __init__(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Callable:
        method = getattr(self._servicer, name)
        return lambda request, timeout=None: method(request, None)


@dataclass
class Replica:
    """One drafter or verifier replica, with what the router needs to balance and fail over."""

    address: str  # "host:port", or "in-process"
    stub: object
    channel: grpc.Channel | None = None
    down_until: float = 0.0
    load: int = 0  # sequences assigned (verifiers)
    info: object | None = None  # its Info response
    key: int = field(init=False)

    def __post_init__(self) -> None:
        self.key = int.from_bytes(hashlib.sha256(self.address.encode()).digest()[:8], "little")

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self) -> None:
        self.down_until = time.monotonic() + RETRY_AFTER_S

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


def remote_verifier(address: str, tls: ClientTls | None = None) -> Replica:
    channel = open_channel(address, tls, CHANNEL_OPTIONS)
    return Replica(address, verifier_pb2_grpc.VerifierStub(channel), channel)


def remote_drafter(address: str, tls: ClientTls | None = None) -> Replica:
    channel = open_channel(address, tls, CHANNEL_OPTIONS)
    return Replica(address, drafter_pb2_grpc.DrafterStub(channel), channel)


def local_replica(servicer: object, name: str = "in-process") -> Replica:
    return Replica(name, InProcessStub(servicer))


def rendezvous_order(key: bytes, replicas: list[Replica]) -> list[Replica]:
    """Replicas by preference for `key` (highest-random-weight hashing): adding or losing one replica moves
    only the keys that preferred it."""
    def weight(replica: Replica) -> bytes:
        return hashlib.sha256(key + replica.key.to_bytes(8, "little")).digest()

    return sorted(replicas, key=weight, reverse=True)
