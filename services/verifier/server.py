"""Start a verifier replica: load the target, allocate its KV cache, serve it until SIGTERM."""

from __future__ import annotations

from specserve.engine.config import CacheConfig
from specserve.engine.llm_engine import build_model
from specserve.learned.checkpoint import target_fingerprint
from specserve.rpc.server import RpcServer
from specserve.rpc.tls import ServerTls
from specserve.v1 import verifier_pb2
from specserve.verifier.core import VerifierCore
from specserve.verifier.servicer import VerifierServicer

SERVICE = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"]


def build_verifier_servicer(model_path: str, dtype: str, cache: CacheConfig, keep_hidden: bool = False,
                            batch_invariant: bool = False) -> VerifierServicer:
    """`keep_hidden`: keep every token's hidden state, for feature drafters (EAGLE) in the pool."""
    model = build_model(model_path, dtype)
    core = VerifierCore(model, cache, keep_hidden=keep_hidden, batch_invariant=batch_invariant)
    return VerifierServicer(core, target_fingerprint(model), dtype)


def serve_verifier(address: str, servicer: VerifierServicer, grace: float, tls: ServerTls | None = None) -> None:
    """Serve on `address` (port 0 picks one; TLS with `tls`), print `verifier grpc=HOST:PORT`, block until
    SIGTERM / SIGINT has drained the server. Main thread only."""
    server = RpcServer([(servicer, SERVICE)], address, tls=tls)
    server.handle_sigterm(grace)
    server.start()
    print(f"verifier grpc={server.address} dtype={servicer.dtype} blocks={servicer.core.cache.num_blocks}", flush=True)
    server.wait()
