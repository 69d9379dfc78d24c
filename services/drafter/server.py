"""Start a drafter replica: load the target where the drafter reads its weights (its fingerprint ties the
replica to verifiers of the same model; drafters that read tokens only load the tokenizer and the embedding
table it is computed from), build the drafter the SpecConfig names, serve it until SIGTERM."""

from __future__ import annotations

from specserve.drafter.servicer import DrafterServicer
from specserve.drafters import build_drafter, check_sources, reads_weights
from specserve.engine.config import SpecConfig
from specserve.engine.llm_engine import build_model, load_tokenizer
from specserve.engine.loader import load_config
from specserve.errors import InvalidRequestError
from specserve.learned.checkpoint import checkpoint_fingerprint, target_fingerprint
from specserve.rpc.server import RpcServer
from specserve.rpc.tls import ServerTls
from specserve.v1 import drafter_pb2

SERVICE = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"]


def build_drafter_servicer(model_path: str, dtype: str, spec: SpecConfig) -> DrafterServicer:
    """The servicer for `spec.method` on the model at `model_path`; "off" is refused. Replicas of drafters
    that read tokens only (n-gram, retrieval, auto without a learned checkpoint) load no weights: seconds
    and the model's memory saved per replica."""
    if not spec.enabled:
        raise InvalidRequestError("a drafter replica needs a draft method, got 'off'")
    check_sources(spec, load_config(model_path))  # before the load
    tokenizer = load_tokenizer(model_path)
    if not reads_weights(spec):
        drafter, fingerprint = build_drafter(spec, None, tokenizer), checkpoint_fingerprint(model_path)
    else:
        model = build_model(model_path, dtype)
        drafter, fingerprint = build_drafter(spec, model, tokenizer), target_fingerprint(model)
    assert drafter is not None
    return DrafterServicer(drafter, fingerprint)


def serve_drafter(address: str, model_path: str, dtype: str, spec: SpecConfig, grace: float,
                  tls: ServerTls | None = None) -> None:
    """Serve on `address` (port 0 picks one; TLS with `tls`), print `drafter grpc=HOST:PORT method=NAME`, and
    block until SIGTERM / SIGINT has drained the server (running calls get `grace` seconds). Main thread only."""
    servicer = build_drafter_servicer(model_path, dtype, spec)
    server = RpcServer([(servicer, SERVICE)], address, tls=tls)
    server.handle_sigterm(grace)
    server.start()
    print(f"drafter grpc={server.address} method={servicer.drafter.name}", flush=True)
    server.wait()
