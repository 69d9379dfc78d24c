"""`specserve serve verifier | drafter | router`, `serve --embedded` (the servers are in specserve.*.server)
and `specserve up` (child processes through specserve.launcher)."""

from __future__ import annotations

import argparse
import sys

from specserve.cli_common import (
    add_drafter_flags, add_kv_dtype_flag, add_model_flags, add_tls_client_flags, as_flags, client_tls,
    drafter_sources, resolve_model,
)
from specserve.engine.config import SPEC_METHODS, CacheConfig, SpecConfig
from specserve.errors import InvalidRequestError, UnavailableError
from specserve.rpc.tls import ClientTls, ServerTls

# A child service of `up`: this interpreter, without the working directory on sys.path (-P).
SERVE_COMMAND = [sys.executable, "-P", "-m", "specserve.cli", "serve"]
# Router flags (their dests) that left at None take RouterConfig's defaults; `up` passes the set ones on.
ROUTER_FLAGS = ("max_queue", "max_num_seqs", "max_batched_tokens", "max_prompt_chars", "num_draft_tokens",
                "default_speculation", "speculation_budget", "draft_ahead")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.embedded == (args.role is not None):
        raise InvalidRequestError("serve takes a role (verifier, drafter, router) or --embedded, and not both")
    if args.role is not None and args.argv[1] != args.role:  # argparse would drop flags given before the role
        raise InvalidRequestError(f"put the flags after the role: specserve serve {args.role} [flags]")
    return args.serve(args)


def cmd_serve_embedded(args: argparse.Namespace) -> int:
    from specserve.router.server import build_embedded_router, serve_router

    methods = [method for method in args.spec.split(",") if method not in ("", "off")]
    tls = server_tls(args)  # checked before the model loads
    router = build_embedded_router(resolve_model(args.model), args.dtype, methods, cache_config(args),
                                   router_config(args), SpecConfig(**drafter_sources(args, methods)))
    serve_router(bind_address(args), router, args.grace, args.http_port, tls)
    return 0


def cmd_serve_verifier(args: argparse.Namespace) -> int:
    from specserve.verifier.server import build_verifier_servicer, serve_verifier

    tls = server_tls(args)
    servicer = build_verifier_servicer(resolve_model(args.model), args.dtype, cache_config(args), args.keep_hidden)
    serve_verifier(bind_address(args), servicer, args.grace, tls)
    return 0


def cmd_serve_drafter(args: argparse.Namespace) -> int:
    from specserve.drafter.server import serve_drafter

    spec = SpecConfig(method=args.spec, **drafter_sources(args, [args.spec]))
    tls = server_tls(args)
    serve_drafter(bind_address(args), resolve_model(args.model), args.dtype, spec, args.grace, tls)
    return 0


def cmd_serve_router(args: argparse.Namespace) -> int:
    import grpc

    from specserve.router.server import build_remote_router, serve_router

    pools = drafter_pools(args.drafter)
    tls = server_tls(args)  # a bad TLS file fails here, before any replica is called
    try:
        router = build_remote_router(resolve_model(args.model), args.verifier, pools, router_config(args),
                                     client_tls(args))
    except grpc.RpcError as exc:
        replicas = ", ".join(args.verifier + [address for addresses in pools.values() for address in addresses])
        raise UnavailableError(f"a replica did not answer Info ({exc.code().name}); replicas: {replicas}") from None
    serve_router(bind_address(args), router, args.grace, args.http_port, tls)
    return 0


def drafter_pools(values: list[str]) -> dict[str, list[str]]:
    """["ngram=h:1", "ngram=h:2", "rest=h:3"] -> {"ngram": ["h:1", "h:2"], "rest": ["h:3"]}."""
    pools: dict[str, list[str]] = {}
    for value in values:
        name, _, address = value.partition("=")
        if not name or not address:
            raise InvalidRequestError(f"--drafter takes NAME=HOST:PORT, got {value!r}")
        pools.setdefault(name, []).append(address)
    return pools


def cmd_up(args: argparse.Namespace) -> int:
    from specserve.drafters import needs_hidden
    from specserve.launcher import Launcher

    if args.verifiers < 1 or args.drafters < 0:
        raise InvalidRequestError("--verifiers must be >= 1 and --drafters >= 0")
    spec = SpecConfig(method=args.spec, **drafter_sources(args, [args.spec]))
    model = resolve_model(args.model)  # fetched once here, not by every child
    tls_server, tls_client = up_tls_flags(args)
    common = ["--host", args.host, "--port", "0", "--model", model, "--dtype", args.dtype, "--grace", str(args.grace),
              *tls_server]
    verifier = [*SERVE_COMMAND, "verifier", *common, *as_flags(
        num_blocks=args.num_blocks, block_size=args.block_size, kv_dtype=args.kv_dtype, keep_hidden=needs_hidden(spec))]
    drafter = [*SERVE_COMMAND, "drafter", "--spec", spec.method, *common, *as_flags(
        datastore=spec.datastore_path, draft_checkpoint=spec.draft_checkpoint, exit_layer=spec.exit_layer)]
    services = [(f"verifier-{i}", verifier) for i in range(args.verifiers)]
    services += [(f"drafter-{i}", drafter) for i in range(args.drafters if spec.enabled else 0)]
    launcher_tls = ClientTls.from_files(*tls_client[1::2]) if tls_client else None
    with Launcher(args.start_timeout, stop_timeout_s=args.grace + 10, tls=launcher_tls) as launcher:
        backends = launcher.start(services)
        router = [*SERVE_COMMAND, "router", "--host", args.host, "--port", str(args.port), "--model", model,
                  "--grace", str(args.grace), *as_flags(http_port=args.http_port), *tls_server, *tls_client,
                  *as_flags(**{dest: getattr(args, dest) for dest in ROUTER_FLAGS})]
        for child in backends:
            is_verifier = child.name.startswith("verifier")
            router += ["--verifier", child.address] if is_verifier else ["--drafter", f"{spec.method}={child.address}"]
        launcher.start([("router", router)])
        for child in launcher.children:
            print(child.summary, flush=True)
        launcher.watch()
    return 0


def up_tls_flags(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """`up`'s TLS settings as every child's server flags and the router's (and the launcher's) client flags:
    the replicas are checked against --tls-ca (default: --tls-cert itself, right for a self-signed
    certificate) and, where --tls-client-ca makes them ask, shown --tls-cert and --tls-key."""
    tls = server_tls(args)
    if tls is None:
        if args.tls_ca:
            raise InvalidRequestError("--tls-ca without --tls-cert and --tls-key: the services would not use TLS")
        return [], []
    server = as_flags(tls_cert=tls.cert, tls_key=tls.key, tls_client_ca=tls.client_ca)
    client = ["--tls-ca", str(args.tls_ca or tls.cert)]
    if tls.client_ca is not None:
        client += ["--tls-client-cert", str(tls.cert), "--tls-client-key", str(tls.key)]
    return server, client


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The service's TLS settings from --tls-cert, --tls-key, --tls-client-ca; None = plaintext."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise InvalidRequestError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise InvalidRequestError("--tls-cert and --tls-key go together")
    return ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)


def bind_address(args: argparse.Namespace) -> str:
    return f"{args.host}:{args.port}"


def cache_config(args: argparse.Namespace) -> CacheConfig:
    return CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks, dtype=args.kv_dtype or "float32")


def router_config(args: argparse.Namespace):
    from specserve.router.core import RouterConfig

    fields = {"max_num_batched_tokens" if dest == "max_batched_tokens" else dest: getattr(args, dest)
              for dest in ROUTER_FLAGS}
    if fields["draft_ahead"] is not None:
        fields["draft_ahead"] = fields["draft_ahead"] == "on"
    return RouterConfig(**{name: value for name, value in fields.items() if value is not None})


def add_serve_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve one gRPC service (verifier, drafter or router), or with --embedded "
                           "the router API with everything in this process; prints `ROLE grpc=HOST:PORT ...`")
    serve.add_argument("--embedded", action="store_true",
                       help="router, verifier and drafters in this process (flags: those below)")
    serve.add_argument("--spec", default="ngram", metavar="METHOD[,METHOD...]",
                       help=f"drafters of --embedded, of {','.join(SPEC_METHODS)} (default ngram; off = none)")
    add_bind_flags(serve, port=50051)
    add_tls_server_flags(serve)
    add_model_flags(serve)
    add_cache_flags(serve)
    add_drafter_flags(serve)
    add_router_flags(serve)
    serve.set_defaults(func=cmd_serve, serve=cmd_serve_embedded)
    roles = serve.add_subparsers(dest="role")

    verifier = roles.add_parser("verifier", help="the target model and its paged KV cache")
    add_bind_flags(verifier, port=0)
    add_tls_server_flags(verifier)
    add_model_flags(verifier)
    add_cache_flags(verifier)
    verifier.add_argument("--keep-hidden", action="store_true",
                          help="keep every token's hidden state, for feature drafters (eagle, auto with eagle)")
    verifier.set_defaults(serve=cmd_serve_verifier)

    drafter = roles.add_parser("drafter", help="one draft method")
    drafter.add_argument("--spec", required=True, choices=[m for m in SPEC_METHODS if m != "off"])
    add_bind_flags(drafter, port=0)
    add_tls_server_flags(drafter)
    add_model_flags(drafter)
    add_drafter_flags(drafter)
    drafter.set_defaults(serve=cmd_serve_drafter)

    router = roles.add_parser("router", help="the public Router API over verifier and drafter replicas")
    router.add_argument("--verifier", action="append", required=True, metavar="HOST:PORT",
                        help="a verifier replica (repeatable)")
    router.add_argument("--drafter", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="a drafter replica, under the name requests pick it by (repeatable)")
    add_bind_flags(router, port=50051)
    add_tls_server_flags(router)
    add_tls_client_flags(router, "the verifier and drafter replicas")
    router.add_argument("--model", help="model whose tokenizer to use (default: SmolLM2-135M)")
    add_router_flags(router)
    router.set_defaults(serve=cmd_serve_router)


def add_up_parser(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start verifier and drafter replicas and a router as processes on this host; "
                        "prints one line per service, runs until Ctrl-C / SIGTERM")
    up.add_argument("--verifiers", type=int, default=1, metavar="M", help="verifier replicas (default 1)")
    up.add_argument("--drafters", type=int, default=1, metavar="N", help="drafter replicas (default 1)")
    up.add_argument("--spec", default="ngram", choices=SPEC_METHODS,
                    help="the drafters' method (default ngram; off = no drafter pool); verifiers keep hidden states "
                    "when it needs them")
    up.add_argument("--start-timeout", type=float, default=300.0, help="seconds each service gets to start serving")
    add_bind_flags(up, port=50051)
    add_tls_server_flags(up)
    up.add_argument("--tls-ca", metavar="PEM", help="CA the router checks its replicas' certificates against "
                    "(default: --tls-cert itself, for a self-signed certificate)")
    add_model_flags(up)
    add_cache_flags(up)
    add_drafter_flags(up)
    add_router_flags(up)
    up.set_defaults(func=cmd_up)


def add_bind_flags(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on, 0 = any free one (default {port})")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds running calls get to finish after SIGTERM (default 10)")


def add_tls_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="serve over TLS with this certificate (chain); needs --tls-key")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="require client certificates signed by this CA (mutual TLS)")


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-blocks", type=int, default=CacheConfig.num_blocks,
                        help=f"KV cache blocks of each verifier (default {CacheConfig.num_blocks})")
    parser.add_argument("--block-size", type=int, default=CacheConfig.block_size,
                        help=f"token slots per KV block (default {CacheConfig.block_size})")
    add_kv_dtype_flag(parser)


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models) on this port of --host, 0 = any free one (default: no HTTP)")
    parser.add_argument("--max-queue", type=int,
                        help="waiting requests; beyond them a request gets RESOURCE_EXHAUSTED (default 256)")
    parser.add_argument("--max-num-seqs", type=int, help="requests decoding at once (default 64)")
    parser.add_argument("--max-batched-tokens", type=int, help="tokens of one step over all verifiers (default 512)")
    parser.add_argument("--max-prompt-chars", type=int, help="longest prompt accepted, in characters (default 1048576)")
    parser.add_argument("--num-draft-tokens", type=int, help="most drafted tokens a sequence verifies per step "
                        "(default 8)")
    parser.add_argument("--default-speculation", choices=("off", "lossless", "lossy"),
                        help="speculation of requests that leave it unspecified (default lossless)")
    parser.add_argument("--speculation-budget", choices=("cost", "static"),
                        help="cost: draft only the tokens the measured verify cost and each request's acceptance "
                        "say pay off (default); static: min(--num-draft-tokens, 64 / speculating requests)")
    parser.add_argument("--draft-ahead", choices=("on", "off"),
                        help="token-only drafters draft the next step while this one verifies (default on)")


