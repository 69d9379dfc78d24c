"""Build a router (over remote replicas, or embedded with everything in this process) and serve it."""

from __future__ import annotations

import dataclasses
import os

from specserve.drafter.servicer import DrafterServicer
from specserve.drafters import build_drafter, check_sources
from specserve.engine.config import CacheConfig, SpecConfig
from specserve.engine.llm_engine import build_model, load_tokenizer
from specserve.engine.loader import load_config
from specserve.engine.model import LlamaModel
from specserve.engine.tokenizer import Tokenizer
from specserve.learned.checkpoint import target_fingerprint
from specserve.router.backends import Replica, local_replica, remote_drafter, remote_verifier
from specserve.router.core import Router, RouterConfig
from specserve.router.openai_http import start_openai_http
from specserve.router.servicer import RouterServicer
from specserve.rpc.server import RpcServer
from specserve.v1 import router_pb2
from specserve.verifier.core import VerifierCore
from specserve.verifier.servicer import VerifierServicer

SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"]


def build_embedded_router(model_path: str, dtype: str, methods: list[str], cache: CacheConfig,
                          config: RouterConfig = RouterConfig(), spec: SpecConfig = SpecConfig(),
                          batch_invariant: bool = False) -> Router:
    """Router, one verifier and one drafter per method in this process, sharing one copy of the weights;
    the router calls their servicers directly with the same messages it sends over the network.
    `spec` carries the drafters' options (datastore, checkpoint, exit layer); its method is ignored."""
    model_config = load_config(model_path)
    for method in methods:  # a bad drafter setting fails before the load
        check_sources(dataclasses.replace(spec, method=method), model_config)
    return embedded_router(build_model(model_path, dtype), load_tokenizer(model_path), dtype, methods, cache,
                           config, spec, batch_invariant, model_name=os.path.basename(model_path))


def embedded_router(model: LlamaModel, tokenizer: Tokenizer, dtype: str, methods: list[str], cache: CacheConfig,
                    config: RouterConfig = RouterConfig(), spec: SpecConfig = SpecConfig(),
                    batch_invariant: bool = False, model_name: str = "") -> Router:
    """`build_embedded_router` on a model already loaded (tests share one)."""
    fingerprint = target_fingerprint(model)
    drafters: dict[str, list[Replica]] = {}
    needs_hidden = False
    for method in methods:
        drafter = build_drafter(dataclasses.replace(spec, method=method), model, tokenizer)
        assert drafter is not None
        needs_hidden |= drafter.needs_hidden
        drafters[method] = [local_replica(DrafterServicer(drafter, fingerprint), f"in-process:{method}")]
    core = VerifierCore(model, cache, keep_hidden=needs_hidden, batch_invariant=batch_invariant)
    verifier = local_replica(VerifierServicer(core, fingerprint, dtype))
    if not methods:
        config = dataclasses.replace(config, default_speculation="off")
    return Router(tokenizer, [verifier], drafters, config, model_name=model_name)


def build_remote_router(model_path: str, verifiers: list[str], drafters: dict[str, list[str]],
                        config: RouterConfig = RouterConfig(), tls: ClientTls | None = None) -> Router:
    """Router over replicas at the given addresses (over TLS with `tls`); `model_path` supplies only the
    tokenizer."""
    return Router(
        load_tokenizer(model_path),
        [remote_verifier(address, tls) for address in verifiers],
        {name: [remote_drafter(address, tls) for address in addresses] for name, addresses in drafters.items()},
        config,
        model_name=os.path.basename(model_path),
    )


def serve_router(address: str, router: Router, grace: float, http_port: int | None = None,
                 tls: ServerTls | None = None) -> None:
    """Serve on `address` (port 0 picks one), and the OpenAI-compatible HTTP API on `http_port` of the same
    host when given; with `tls`, both over TLS (gRPC and HTTPS). Print `router grpc=HOST:PORT
    [http=HOST:PORT] drafters=...`; block until SIGTERM / SIGINT has drained the server, then stop the
    batching loop. Main thread only."""
    router.start()
    server = RpcServer([(RouterServicer(router), SERVICE)], address, tls=tls)
    http = None
    if http_port is not None:
        http = start_openai_http(router, address.rsplit(":", 1)[0], http_port,
                                 ssl_context=tls.ssl_context() if tls is not None else None)
    server.handle_sigterm(grace, on_drained=http.shutdown if http is not None else None)
    server.start()
    http_text = f" http={address.rsplit(':', 1)[0]}:{http.port}" if http is not None else ""
    print(f"router grpc={server.address}{http_text} drafters={','.join(router.drafters) or 'none'}", flush=True)
    server.wait()
    router.stop()
