"""`specserve` command line: `generate` (one streamed generation, embedded mode), `pull`, `datastore build`,
`train-draft`, `bench spec | lossy`.

Errors end with one line on stderr and a non-zero exit code (see specserve.errors); nothing below the
CLI reads the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from specserve.engine.config import SPEC_METHODS, WEIGHT_DTYPES, EngineConfig, SamplingParams, SpecConfig
from specserve.errors import InvalidRequestError, SpecserveError
from specserve.model_fetch import ensure_default_model, specserve_home


def resolve_model(path: str | None) -> str:
    """`--model PATH` as given, else the default model, fetched on first use."""
    if path:
        return path
    offline = os.environ.get("SPECSERVE_OFFLINE") == "1"
    return str(ensure_default_model(specserve_home(os.environ), offline=offline, progress=_log))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_pull(args: argparse.Namespace) -> int:
    path = ensure_default_model(specserve_home(os.environ), offline=False, progress=_log)
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from specserve.engine.llm_engine import LLMEngine  # torch import is slow; keep `pull` light

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    if not args.prompt:
        raise InvalidRequestError("prompt is empty")
    spec = spec_config(args)
    load_start = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(
        model_path=resolve_model(args.model), dtype=args.dtype, spec=spec, batch_invariant=args.batch_invariant
    ))
    load_seconds = time.perf_counter() - load_start
    prompt_ids = engine.encode_prompt(args.prompt, chat=not args.raw)
    start = time.perf_counter()
    first_token_at: float | None = None
    token_ids: list[int] = []
    text: list[str] = []
    finish_reason = None
    spec_stats = None
    for out in engine.stream(prompt_ids, params):
        first_token_at = first_token_at or time.perf_counter()
        token_ids += out.new_token_ids
        text.append(out.text_delta)
        finish_reason = out.finish_reason
        spec_stats = out.spec or spec_stats
        if not args.json:
            print(out.text_delta, end="", flush=True)
    seconds = time.perf_counter() - start
    stats = {
        "new_tokens": len(token_ids),
        "seconds": round(seconds, 4),
        "tokens_per_s": round(len(token_ids) / seconds, 2) if seconds > 0 else 0.0,
        "prompt_tokens": len(prompt_ids),
        "time_to_first_token_s": round((first_token_at or start) - start, 4),
        "load_seconds": round(load_seconds, 3),
        "dtype": args.dtype,
        "spec": {"method": spec.method, **(spec_stats.as_dict() if spec_stats else {}),
                 "draft_seconds": round(engine.draft_seconds, 4), "forward_seconds": round(engine.forward_seconds, 4)},
    }
    if args.json:
        print(json.dumps({
            "text": "".join(text),
            "token_ids": token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": finish_reason,
            "stats": stats,
        }))
    else:
        print()
        tau = f", spec={spec.method} tau={spec_stats.mean_accepted_len:.2f}" if spec.enabled and spec_stats else ""
        _log(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s, {stats['tokens_per_s']:.1f} tok/s, "
             f"finish={finish_reason}, dtype={args.dtype}{tau}]")
    return 0


def spec_config(args: argparse.Namespace) -> SpecConfig:
    """Speculation flags -> SpecConfig; the default datastore / EAGLE checkpoint are used when rest / eagle
    (and auto, where they exist) get none."""
    from specserve.drafters.datastore import default_datastore_path

    datastore = args.datastore
    if datastore is None and args.spec in ("rest", "auto"):
        default = default_datastore_path(specserve_home(os.environ))
        # rest reports a missing default (with the command that builds it); auto just drafts without it.
        datastore = str(default) if args.spec == "rest" or default.exists() else None
    lossy = None
    if args.lossy:
        from specserve.engine.acceptance import LossyConfig

        knobs = {"top_k": args.lossy_top_k, "min_ratio": args.lossy_min_ratio, "budget": args.lossy_budget}
        lossy = LossyConfig(**{name: value for name, value in knobs.items() if value is not None})
    checkpoint = args.draft_checkpoint
    if checkpoint is None and args.spec in ("eagle", "auto"):
        from specserve.learned.checkpoint import default_checkpoint_path

        default = default_checkpoint_path(specserve_home(os.environ), "eagle")
        # eagle reports a missing default (with the command that makes it); auto drafts without it.
        checkpoint = str(default) if args.spec == "eagle" or default.exists() else None
    return SpecConfig(method=args.spec, num_draft_tokens=args.num_draft_tokens, datastore_path=datastore, lossy=lossy,
                      exit_layer=args.exit_layer, draft_checkpoint=checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description="Speculative-decoding LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    pull = sub.add_parser("pull", help="download and verify the default model (SmolLM2-135M-Instruct GGUF)")
    pull.set_defaults(func=cmd_pull)

    gen = sub.add_parser("generate", help="generate from one prompt in embedded mode, streaming to stdout")
    gen.add_argument("prompt", help="user message (chat template applied) or raw text with --raw")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--model", help="GGUF file or Hugging Face safetensors directory (default: SmolLM2-135M)")
    gen.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="weight precision")
    gen.add_argument("--batch-invariant", action="store_true",
                     help="float64 attention: a token's logits never depend on the rest of the batch (slower)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None, help="makes sampled output reproducible")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print exactly one JSON object instead of streaming")
    gen.add_argument("--spec", default="off", metavar="{" + ",".join(SPEC_METHODS) + "}",
                     help="speculative decoding drafter (lossless unless --lossy); auto merges the available ones")
    gen.add_argument("--num-draft-tokens", type=int, default=SpecConfig.num_draft_tokens,
                     help="most drafted tokens verified per step")
    gen.add_argument("--datastore", help="retrieval datastore for --spec rest/auto (default: the cache's default.npz)")
    gen.add_argument("--exit-layer", type=int, default=None,
                     help="decoder layers the --spec early-exit drafter runs, 1 .. the model's layers - 1 "
                     "(default: the model's layers - 2)")
    gen.add_argument("--draft-checkpoint", help="trained checkpoint for --spec eagle "
                     "(default: the cache's drafters/eagle.safetensors, made by specserve train-draft)")
    gen.add_argument("--lossy", action="store_true", help="relaxed acceptance within a divergence budget (not exact)")
    gen.add_argument("--lossy-top-k", type=int, help="relax only tokens in the target's top k (0 = any; default 3)")
    gen.add_argument("--lossy-min-ratio", type=float, help="relax only if p(x) >= ratio * max p (default 0.3)")
    gen.add_argument("--lossy-budget", type=float, help="nats of divergence a request may spend (default 32)")
    gen.set_defaults(func=cmd_generate)
    add_datastore_parser(sub)
    add_train_draft_parser(sub)
    add_bench_parser(sub)
    return parser


# --- `specserve datastore build` (logic in specserve.drafters.datastore) ---

def cmd_datastore_build(args: argparse.Namespace) -> int:
    from specserve.drafters.datastore import build_datastore_file, default_datastore_path

    out = args.out or default_datastore_path(specserve_home(os.environ))
    print(build_datastore_file(args.inputs, out, resolve_model(args.model), max_docs=args.max_docs))
    return 0


def add_datastore_parser(sub: argparse._SubParsersAction) -> None:
    datastore = sub.add_parser("datastore", help="token datastores for the retrieval drafter (rest)")
    actions = datastore.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="tokenize JSONL corpora into a datastore; prints one summary line")
    build.add_argument("inputs", nargs="+", metavar="FILE.jsonl", help="corpus files, one JSON object per line")
    build.add_argument("--out", help="datastore file to write (default: the cache's datastores/default.npz)")
    build.add_argument("--model", help="GGUF whose tokenizer to use (default: SmolLM2-135M)")
    build.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    build.set_defaults(func=cmd_datastore_build)


# --- `specserve train-draft` (logic in specserve.learned.train_draft) ---

def cmd_train_draft(args: argparse.Namespace) -> int:
    from specserve.bench.common import default_data_dir
    from specserve.learned.checkpoint import default_checkpoint_path
    from specserve.learned.distill_data import DistillConfig
    from specserve.learned.train_draft import TrainDraftConfig, train_draft
    from specserve.learned.train_eagle import TrainConfig

    def given(**flags: object) -> dict[str, object]:  # flags left at None take the config's default
        return {name: value for name, value in flags.items() if value is not None}

    home = specserve_home(os.environ)
    config = TrainDraftConfig(
        model_path=resolve_model(args.model),
        train_dir=Path(args.train_data) if args.train_data else default_data_dir(os.environ) / "train",
        cache_dir=Path(args.data_dir) if args.data_dir else home / "distill",
        out=Path(args.out) if args.out else default_checkpoint_path(home, args.kind),
        distill=DistillConfig(**given(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed)),
        train=TrainConfig(loss=args.loss, device=args.device, **given(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every)),
        resume=args.resume,
        **given(draft_vocab_size=args.draft_vocab),
    )
    print(json.dumps(asdict(train_draft(config))))
    return 0


def add_train_draft_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train-draft", help="self-distil a learned drafter from the target; prints one JSON "
                           "summary (corpus, vocabulary coverage, phase times, loss, held-out accuracy)")
    train.add_argument("--kind", choices=("eagle",), default="eagle", help="drafter to train")
    train.add_argument("--out", help="checkpoint to write (default: the cache's drafters/KIND.safetensors)")
    train.add_argument("--model", help="target GGUF file or safetensors directory (default: SmolLM2-135M)")
    train.add_argument("--loss", choices=("hard", "soft", "unroll"), default="soft",
                       help="hard: CE on the target's tokens; soft: KL to the target's distribution; unroll: soft "
                       "plus a second step on the head's own features (all with feature regression)")
    train.add_argument("--prompts", type=int, help="training prompts the target answers (default 1200)")
    train.add_argument("--max-new-tokens", type=int, help="most tokens of each response (default 256)")
    train.add_argument("--draft-vocab", type=int, help="draft vocabulary: the most frequent tokens (default 8192)")
    train.add_argument("--epochs", type=int, help="passes over the corpus (default 12)")
    train.add_argument("--batch-size", type=int, help="sequences per optimizer step (default 8)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 5e-3)")
    train.add_argument("--seed", type=int, help="prompt order, held-out split, init and batch order (default 0)")
    train.add_argument("--save-every", type=int, help="steps between training-state saves (default 100)")
    train.add_argument("--resume", action="store_true", help="continue from the training state beside --out")
    train.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    train.add_argument("--data-dir", help="distilled-corpus cache (default: the cache's distill/)")
    train.add_argument("--train-data", help="folder of *.jsonl training prompts (default: $SPECSERVE_DATA_DIR/train, "
                       "else shared/data/train beside the checkout)")
    train.set_defaults(func=cmd_train_draft)


# --- `specserve bench spec | lossy` (logic in specserve.bench) ---

def bench_fields(args: argparse.Namespace, **given: object) -> dict[str, object]:
    """Config fields from the flags both benchmarks share and the environment; `given` flags left at None
    are dropped, so the config's own defaults apply."""
    from specserve.bench.common import default_data_dir
    from specserve.drafters.datastore import default_datastore_path
    from specserve.learned.checkpoint import default_checkpoint_path

    home = specserve_home(os.environ)
    return {
        "model_path": Path(resolve_model(None)),
        "data_dir": Path(args.data_dir) if args.data_dir else default_data_dir(os.environ),
        "datastore": Path(args.datastore) if args.datastore else default_datastore_path(home),
        "draft_checkpoint": Path(args.draft_checkpoint or default_checkpoint_path(home, "eagle")),
        "dtype": args.dtype,
        "num_draft_tokens": args.num_draft_tokens,
        "doc": bench_doc(args),
        "command": shlex.join(["specserve", *args.argv]),
        **{name: value for name, value in given.items() if value is not None},
    }


def bench_doc(args: argparse.Namespace) -> Path | None:
    """Where the results go: --doc, else the checkout's docs/benchmarks.md; None prints only."""
    from specserve.bench.common import default_doc_path

    if args.no_write:
        return None
    if args.doc:
        doc = Path(args.doc)
        if not doc.parent.is_dir():
            raise InvalidRequestError(f"--doc {doc}: no directory {doc.parent}")
        return doc
    doc = default_doc_path()
    if doc is None or not doc.exists():
        _log("no docs/benchmarks.md here (not running from a checkout): printing only; --doc PATH writes one")
        return None
    return doc


def cmd_bench_spec(args: argparse.Namespace) -> int:
    from specserve.bench.spec import SpecBenchConfig, run_bench

    quick = {"per_category": 1, "max_tokens": 32} if args.quick else {}
    run_bench(SpecBenchConfig(**{**quick, **bench_fields(
        args, drafters=tuple(d for d in args.drafters.split(",") if d), per_category=args.per_category,
        max_tokens=args.max_tokens, hf=not args.no_hf,
    )}))
    return 0


def cmd_bench_lossy(args: argparse.Namespace) -> int:
    from specserve.bench.lossy import LossyBenchConfig, parse_settings, run_bench

    settings = parse_settings(args.lossy_settings) if args.lossy_settings is not None else None
    run_bench(LossyBenchConfig(**bench_fields(
        args, problems=args.problems, max_tokens=args.max_tokens, drafter=args.drafter,
        concurrency=args.concurrency, settings=settings,
    )))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    drafters = ",".join(m for m in SPEC_METHODS if m != "off")
    bench = sub.add_parser("bench", help="benchmarks: print markdown, rewrite their section of docs/benchmarks.md")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    spec = kinds.add_parser("spec", help="speculative decoding per Spec-Bench category (+ HumanEval, GSM8K) "
                            "against plain decoding and transformers; greedy, batch 1")
    spec.add_argument("--per-category", type=int, help="prompts per category (default 5)")
    spec.add_argument("--max-tokens", type=int, help="most new tokens per prompt (default 128)")
    spec.add_argument("--drafters", default="ngram,rest,auto", help=f"comma list of drafters to compare, of {drafters}")
    spec.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    spec.add_argument("--quick", action="store_true",
                      help="smoke run: 1 prompt per category, 32 tokens (--per-category / --max-tokens still win)")
    add_bench_flags(spec)
    spec.set_defaults(func=cmd_bench_spec)

    lossy = kinds.add_parser("lossy", help="lossy acceptance against lossless on GSM8K: accuracy, tok/s, tau")
    lossy.add_argument("--problems", type=int, help="the first N GSM8K test problems (default 200)")
    lossy.add_argument("--max-tokens", type=int, help="most new tokens per problem (default 256)")
    lossy.add_argument("--drafter", help=f"one of {drafters} (default ngram)")
    lossy.add_argument("--concurrency", type=int, help="requests in flight in each setting's engine (default 8)")
    lossy.add_argument("--lossy-settings", metavar="K:R:B,...",
                       help="lossy settings to run besides lossless and the default, as top_k:min_ratio:budget "
                       "(default 2:0.5:2,2:0.5:16,0:0.2:64)")
    add_bench_flags(lossy)
    lossy.set_defaults(func=cmd_bench_lossy)


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="specserve weight precision")
    parser.add_argument("--num-draft-tokens", type=int, default=SpecConfig.num_draft_tokens,
                        help="most drafted tokens verified per step")
    parser.add_argument("--datastore", help="retrieval datastore for rest/auto (default: the cache's default.npz, "
                        "built by `specserve datastore build ../shared/data/train/*.jsonl`)")
    parser.add_argument("--draft-checkpoint", help="checkpoint for the eagle drafter (default: the cache's "
                        "drafters/eagle.safetensors, made by `specserve train-draft --kind eagle`)")
    parser.add_argument("--data-dir", help="prompt data (default: $SPECSERVE_DATA_DIR, else shared/data beside the "
                        "checkout)")
    parser.add_argument("--doc", help="results doc whose section to rewrite (default: the checkout's "
                        "docs/benchmarks.md)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no doc")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for the benchmarks' doc sections
    try:
        return args.func(args)
    except SpecserveError as exc:
        _log(f"specserve: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _log("specserve: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
