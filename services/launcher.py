"""Run specserve services as child processes on one host, for `specserve up`: start them in tiers (a tier's
processes start together and must all serve before the next tier starts), watch them, stop them last tier
first.

A child prints its `ROLE grpc=HOST:PORT ...` line on stdout once it serves; it counts as ready when that
address answers grpc.health.v1 Check with SERVING. Its stderr is passed on, prefixed with its name, and its
last lines go into the error when it fails. Children run in their own process group (a Ctrl-C at the
terminal reaches only the launcher, which stops them in order) and, on Linux, get SIGTERM if the launcher
dies without stopping them.
"""

from __future__ import annotations

import collections
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.errors import UnavailableError
from specserve.rpc.tls import ClientTls, open_channel

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Looked up here, not in the forked child, where loading a library could deadlock on another thread's lock.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
POLL_S = 0.2
TAIL_LINES = 5


@dataclass
class Child:
    """One service process: `name` (verifier-0, router, ...), its first stdout line and its address."""

    name: str
    process: subprocess.Popen
    line: str | None = None  # `ROLE grpc=HOST:PORT ...` as the child printed it
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    pumps: list[threading.Thread] = field(default_factory=list)

    @property
    def address(self) -> str | None:
        fields = dict(f.split("=", 1) for f in (self.line or "").split()[1:] if "=" in f)
        return fields.get("grpc")

    @property
    def summary(self) -> str:
        """The child's line with its role replaced by its name: `verifier-0 grpc=127.0.0.1:41234 ...`."""
        assert self.line is not None
        return f"{self.name} {self.line.split(maxsplit=1)[1]}"

    def failure(self, what: str) -> UnavailableError:
        if self.process.poll() is not None:  # its last lines may still be in the pipe
            for pump in self.pumps:
                pump.join(timeout=2.0)
        tail = " | ".join(self.stderr_tail) or "no output on stderr"
        return UnavailableError(f"{self.name} (pid {self.process.pid}) {what}; its stderr ended: {tail}")


class Launcher:
    """`with Launcher(...) as launcher: launcher.start(tier) ...; launcher.watch()`. Leaving the block stops
    every child. SIGTERM / SIGINT end `watch` (and abort `start` with KeyboardInterrupt). Main thread only."""

    def __init__(self, start_timeout_s: float = 300.0, stop_timeout_s: float = 20.0,
                 tls: ClientTls | None = None) -> None:
        """`tls`: how the health checks reach children that serve over TLS."""
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.tls = tls
        self.tiers: list[list[Child]] = []
        self._stop_requested = threading.Event()
        self._previous_handlers: dict[int, object] = {}

    @property
    def children(self) -> list[Child]:
        return [child for tier in self.tiers for child in tier]

    def __enter__(self) -> Launcher:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, lambda *_: self._stop_requested.set())
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)

    def start(self, services: Sequence[tuple[str, list[str]]]) -> list[Child]:
        """Start (name, argv) processes together; return once every one serves. Raises UnavailableError
        naming the first that exits or is not serving within the start timeout."""
        tier = [self._spawn(name, argv) for name, argv in services]
        self.tiers.append(tier)
        self._wait_serving(tier, time.monotonic() + self.start_timeout_s)
        return tier

    def watch(self) -> None:
        """Block until SIGTERM / SIGINT (return) or a child's exit (UnavailableError naming it)."""
        while not self._stop_requested.wait(POLL_S):
            for child in self.children:
                if child.process.poll() is not None:
                    raise child.failure(f"exited with code {child.process.returncode}; stopped the other services")

    def stop(self) -> None:
        """SIGTERM the children, last tier first (the router before its replicas), each tier waited for;
        a child still running after the stop timeout is killed."""
        for tier in reversed(self.tiers):
            for child in tier:
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            for child in tier:
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"{child.name} did not stop within {self.stop_timeout_s:.0f} s: killed", file=sys.stderr)
                    child.process.kill()
                    child.process.wait()
                for pump in child.pumps:
                    pump.join(timeout=1.0)

    # ---- internals -------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> Child:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, bufsize=1, process_group=0, preexec_fn=_die_with_parent)
        child = Child(name, process)
        child.pumps = [threading.Thread(target=_pump_stdout, args=(child,), daemon=True),
                       threading.Thread(target=_pump_stderr, args=(child,), daemon=True)]
        for pump in child.pumps:
            pump.start()
        return child

    def _wait_serving(self, tier: list[Child], deadline: float) -> None:
        pending = list(tier)
        while pending:
            if self._stop_requested.is_set():
                raise KeyboardInterrupt
            for child in pending:
                if child.process.poll() is not None:
                    raise child.failure(f"exited with code {child.process.returncode} before serving")
            if time.monotonic() > deadline:
                raise pending[0].failure(f"was not serving within {self.start_timeout_s:.0f} s")
            pending = [child for child in pending if child.address is None or not _serving(child.address, self.tls)]
            if pending:
                self._stop_requested.wait(POLL_S)


def _serving(address: str, tls: ClientTls | None) -> bool:
    """Whether grpc.health.v1 Check on `address` answers SERVING (the whole server: service "")."""
    with open_channel(address, tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _pump_stdout(child: Child) -> None:
    """The first line with an address is the child's; anything else goes to stderr."""
    stream: IO[str] = child.process.stdout
    for line in stream:
        if child.line is None and " grpc=" in line:
            child.line = line.strip()
        else:
            print(f"[{child.name}] {line}", end="", file=sys.stderr, flush=True)


def _pump_stderr(child: Child) -> None:
    stream: IO[str] = child.process.stderr
    for line in stream:
        child.stderr_tail.append(line.rstrip())
        print(f"[{child.name}] {line}", end="", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child before exec: have the kernel SIGTERM it if the launcher dies (Linux; elsewhere a no-op)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))
