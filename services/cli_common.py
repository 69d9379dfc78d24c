"""What `specserve`'s commands share: the model and drafter defaults, flag groups that several commands
take, and TLS settings for the calls they make (services/cli.py: the commands that run in this process;
services/cli_serve.py: `serve` and `up`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from specserve.engine.config import KV_DTYPES, LEARNED_METHODS, WEIGHT_DTYPES
from specserve.errors import InvalidRequestError
from specserve.model_fetch import ensure_default_model, specserve_home
from specserve.rpc.tls import ClientTls


def resolve_model(path: str | None) -> str:
    """`--model PATH` as given, else the default model, fetched on first use."""
    if path:
        return path
    offline = os.environ.get("SPECSERVE_OFFLINE") == "1"
    return str(ensure_default_model(specserve_home(os.environ), offline=offline, progress=log))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def drafter_sources(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, object]:
    """SpecConfig's drafter options for `methods` from --datastore / --draft-checkpoint / --exit-layer. Without
    a flag the cache's default datastore (rest, auto) and checkpoint of the learned drafter's kind (eagle,
    medusa, draft-model, exit-head) are used; auto takes, of the learned drafters trained here, the one
    whose held-out agreement promises the most accepted tokens (`best_default_checkpoint`). rest and the
    learned kinds report a missing default (with the command that makes it), auto just drafts without it.
    One --draft-checkpoint serves one learned kind (auto: the kind the checkpoint holds)."""
    home = specserve_home(os.environ)
    datastore = args.datastore
    if datastore is None and {"rest", "auto"} & set(methods):
        from specserve.drafters.datastore import default_datastore_path

        default = default_datastore_path(home)
        datastore = str(default) if "rest" in methods or default.exists() else None
    checkpoint = args.draft_checkpoint
    learned = sorted(set(LEARNED_METHODS) & set(methods))
    if len(learned) > 1:
        raise InvalidRequestError(f"{' and '.join(learned)} cannot be served together: they share --draft-checkpoint")
    if checkpoint is None and learned:
        from specserve.learned.checkpoint import default_checkpoint_path

        checkpoint = str(default_checkpoint_path(home, learned[0]))
    elif checkpoint is None and "auto" in methods:
        from specserve.learned.checkpoint import best_default_checkpoint

        checkpoint = best_default_checkpoint(home)
    return {"datastore_path": datastore, "draft_checkpoint": checkpoint, "exit_layer": args.exit_layer}


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """A channel's TLS settings from --tls-ca, --tls-client-cert, --tls-client-key; None = plaintext."""
    if args.tls_ca is None and args.tls_client_cert is None and args.tls_client_key is None:
        return None
    return ClientTls.from_files(args.tls_ca, args.tls_client_cert, args.tls_client_key)


def as_flags(**values: object) -> list[str]:
    """The set options of a child's command line: as_flags(max_queue=2, keep_hidden=True, datastore=None)
    -> ["--max-queue", "2", "--keep-hidden"]."""
    argv: list[str] = []
    for dest, value in values.items():
        if value is None or value is False:
            continue
        argv += ["--" + dest.replace("_", "-")] + ([] if value is True else [str(value)])
    return argv


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="GGUF file or Hugging Face safetensors directory (default: SmolLM2-135M)")
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="weight precision")


def add_kv_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                        help="KV cache precision (default float32, exact; bfloat16 halves KV memory and the bytes "
                        "attention reads, int8 takes about a quarter)")


def add_drafter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datastore", help="retrieval datastore for rest/auto (default: the cache's default.npz)")
    parser.add_argument("--exit-layer", type=int, default=None,
                        help="decoder layers the early-exit drafter runs, 1 .. the model's layers - 1 "
                        "(default: the model's layers - 2)")
    parser.add_argument("--draft-checkpoint", help="trained checkpoint for eagle, medusa or draft-model (default: "
                        "the cache's drafters/KIND.safetensors, made by specserve train-draft --kind KIND)")


def add_tls_client_flags(parser: argparse.ArgumentParser, peer: str) -> None:
    parser.add_argument("--tls-ca", metavar="PEM", help=f"reach {peer} over TLS, checking its certificate against "
                        "this CA (any --tls-* flag here turns TLS on; without --tls-ca, gRPC's public roots)")
    parser.add_argument("--tls-client-cert", metavar="PEM", help=f"certificate to show {peer} (mutual TLS)")
    parser.add_argument("--tls-client-key", metavar="PEM", help="the private key of --tls-client-cert")
