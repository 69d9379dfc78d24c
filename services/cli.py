"""`specserve` command line: `generate` (one streamed generation, embedded or through a router at --url),
`serve` (one gRPC service, or all of them in one process), `up` (the services as processes on this host),
`pull`, `datastore build`, `train-draft`, `bench spec | lossy`.

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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from specserve.cli_common import (
    add_drafter_flags, add_kv_dtype_flag, add_tls_client_flags, client_tls, drafter_sources, log, resolve_model,
)
from specserve.cli_serve import add_serve_parsers, add_up_parser
from specserve.client import Chunk, Client, Generation, TokenLogprob
from specserve.engine.config import (
    LEARNED_METHODS,
    SPEC_METHODS,
    SPECULATION_BUDGETS,
    WEIGHT_DTYPES,
    CacheConfig,
    EngineConfig,
    SamplingParams,
    SpecConfig,
)
from specserve.errors import InvalidRequestError, SpecserveError, UnavailableError
from specserve.model_fetch import ensure_default_model, specserve_home


def cmd_pull(args: argparse.Namespace) -> int:
    path = ensure_default_model(specserve_home(os.environ), offline=False, progress=log)
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        logprobs=args.logprobs,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )
    if not args.prompt:
        raise InvalidRequestError("prompt is empty")
    if args.url:
        generate_remote(args, params)
    elif args.tls_ca or args.tls_client_cert or args.tls_client_key:
        raise InvalidRequestError("--tls-ca, --tls-client-cert and --tls-client-key are for --url")
    else:
        generate_local(args, params)
    return 0


def generate_local(args: argparse.Namespace, params: SamplingParams) -> None:
    """Embedded mode: load the model here and stream from the engine."""
    from specserve.engine.llm_engine import LLMEngine  # torch import is slow; keep `pull` light

    spec = spec_config(args)
    load_start = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(
        model_path=resolve_model(args.model), dtype=args.dtype, spec=spec, batch_invariant=args.batch_invariant,
        cache=CacheConfig(dtype=args.kv_dtype or "float32"),
    ))
    load_seconds = time.perf_counter() - load_start
    prompt_ids = engine.encode_prompt(args.prompt, chat=not args.raw)
    # The engine's deltas as the router would stream them, so both paths print alike.
    chunks = (Chunk(out.new_token_ids, out.text_delta, out.finished, out.finish_reason, prompt_ids if i == 0 else [],
                    out.spec.as_dict() if out.spec else None, None, out.logprobs)
              for i, out in enumerate(engine.stream(prompt_ids, params)))
    generation, first_token_s = collect_stream(chunks, echo=not args.json)
    spec_stats = {"method": spec.method, **generation.spec, "draft_seconds": round(engine.draft_seconds, 4),
                  "forward_seconds": round(engine.forward_seconds, 4)}
    report_generation(args, generation, first_token_s, round(load_seconds, 3), args.dtype, spec_stats)


def generate_remote(args: argparse.Namespace, params: SamplingParams) -> None:
    """Through the router at --url: its model, dtype and drafters apply. The counters only the engine's
    process knows (load, draft and forward seconds, dtype) are null in --json."""
    engine_flags = {"--model": args.model, "--batch-invariant": args.batch_invariant, "--kv-dtype": args.kv_dtype,
                    "--datastore": args.datastore,
                    "--exit-layer": args.exit_layer, "--draft-checkpoint": args.draft_checkpoint}
    given = [flag for flag, value in engine_flags.items() if value not in (None, False)]
    if given:
        raise InvalidRequestError(f"{', '.join(given)} configure the local engine; the router at --url has its own")
    drafter = "" if args.spec in (None, "off") else args.spec
    speculation = "off" if args.spec == "off" else "lossy" if args.lossy else "lossless" if drafter else "default"
    knobs = {"top_k": args.lossy_top_k, "min_ratio": args.lossy_min_ratio, "budget": args.lossy_budget}
    lossy = {name: value for name, value in knobs.items() if value is not None} if args.lossy else None
    with Client(args.url, tls=client_tls(args)) as client:
        stream = client.stream(
            args.prompt, raw=args.raw, max_tokens=params.max_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, seed=params.seed, stop=params.stop,
            logprobs=params.logprobs, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
            speculation=speculation, lossy=lossy, drafter=drafter,
        )
        try:
            generation, first_token_s = collect_stream(stream, echo=not args.json)
        except UnavailableError as exc:
            raise UnavailableError(f"router at {args.url}: {exc}") from None
    spec_stats = {"method": args.spec or "default", **generation.spec, "draft_seconds": None, "forward_seconds": None}
    report_generation(args, generation, first_token_s, None, None, spec_stats)


def collect_stream(chunks: Iterable[Chunk], echo: bool) -> tuple[Generation, float]:
    """Gather a stream into one Generation, printing its text as it comes when `echo`. `seconds` is timed
    here, from the call to the last chunk; also returns the seconds to the first chunk."""
    start = time.perf_counter()
    first_token_at: float | None = None
    token_ids: list[int] = []
    text: list[str] = []
    prompt_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    finish_reason, spec, usage = None, None, None
    for chunk in chunks:
        first_token_at = first_token_at or time.perf_counter()
        token_ids += chunk.token_ids
        if chunk.logprobs is not None:
            logprobs = logprobs or []
            logprobs += chunk.logprobs
        text.append(chunk.text)
        prompt_ids = prompt_ids or chunk.prompt_token_ids
        finish_reason = chunk.finish_reason or finish_reason
        spec, usage = chunk.spec or spec, chunk.usage or usage
        if echo:
            print(chunk.text, end="", flush=True)
    seconds = time.perf_counter() - start
    generation = Generation("".join(text), token_ids, prompt_ids, finish_reason, spec or {}, usage or {}, seconds,
                            logprobs)
    return generation, (first_token_at or start) - start


def report_generation(args: argparse.Namespace, generation: Generation, first_token_s: float,
                      load_seconds: float | None, dtype: str | None, spec: dict) -> None:
    """`--json`: one object on stdout; else end the streamed text and print the one-line summary."""
    seconds = generation.seconds
    stats = {
        "new_tokens": len(generation.token_ids),
        "seconds": round(seconds, 4),
        "tokens_per_s": round(len(generation.token_ids) / seconds, 2) if seconds > 0 else 0.0,
        "prompt_tokens": len(generation.prompt_token_ids),
        "time_to_first_token_s": round(first_token_s, 4),
        "load_seconds": load_seconds,
        "dtype": dtype,
        "spec": spec,
    }
    if args.json:
        answer = {
            "text": generation.text,
            "token_ids": generation.token_ids,
            "prompt_token_ids": generation.prompt_token_ids,
            "finish_reason": generation.finish_reason,
            "stats": stats,
        }
        if generation.logprobs is not None:
            answer["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                                  for lp in generation.logprobs]
        print(json.dumps(answer))
        return
    print()
    where = f", dtype={dtype}" if dtype else f", router={args.url}"
    tau = f", spec={spec['method']} tau={spec['mean_accepted_len']:.2f}" \
        if spec["method"] != "off" and "mean_accepted_len" in spec else ""
    log(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s, {stats['tokens_per_s']:.1f} tok/s, "
         f"finish={generation.finish_reason}{where}{tau}]")


def spec_config(args: argparse.Namespace) -> SpecConfig:
    """Speculation flags -> SpecConfig (drafter options as in `drafter_sources`)."""
    lossy = None
    if args.lossy:
        from specserve.engine.acceptance import LossyConfig

        knobs = {"top_k": args.lossy_top_k, "min_ratio": args.lossy_min_ratio, "budget": args.lossy_budget}
        lossy = LossyConfig(**{name: value for name, value in knobs.items() if value is not None})
    method = args.spec or "off"
    return SpecConfig(method=method, num_draft_tokens=args.num_draft_tokens, lossy=lossy,
                      speculation_budget=args.speculation_budget, **drafter_sources(args, [method]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description="Speculative-decoding LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    pull = sub.add_parser("pull", help="download and verify the default model (SmolLM2-135M-Instruct GGUF)")
    pull.set_defaults(func=cmd_pull)

    gen = sub.add_parser("generate", help="generate from one prompt in embedded mode, streaming to stdout")
    gen.add_argument("prompt", help="user message (chat template applied) or raw text with --raw")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--url", metavar="HOST:PORT", help="generate through a running router instead of in this "
                     "process; its model and engine settings apply (--model, --dtype, --datastore ... do not)")
    add_tls_client_flags(gen, "the router at --url")
    gen.add_argument("--model", help="GGUF file or Hugging Face safetensors directory (default: SmolLM2-135M)")
    gen.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="weight precision")
    gen.add_argument("--batch-invariant", action="store_true",
                     help="attention rows that never depend on the rest of the batch (prefill attention is slower)")
    add_kv_dtype_flag(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None, help="makes sampled output reproducible")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]; 0 = off")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]; 0 = off")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="divides the logits of tokens already in the prompt or output (> 0; 1 = off)")
    gen.add_argument("--json", action="store_true", help="print exactly one JSON object instead of streaming")
    gen.add_argument("--logprobs", type=int, metavar="N",
                     help="with --json: each token's log probability and its position's N most likely tokens (0-20)")
    gen.add_argument("--spec", metavar="{" + ",".join(SPEC_METHODS) + "}",
                     help="speculative decoding drafter (lossless unless --lossy); auto merges the available ones "
                     "(default: off; with --url, the router's default)")
    gen.add_argument("--num-draft-tokens", type=int, default=SpecConfig.num_draft_tokens,
                     help="most drafted tokens verified per step")
    gen.add_argument("--speculation-budget", choices=SPECULATION_BUDGETS, default=SpecConfig.speculation_budget,
                     help="cost: draft only the tokens this engine's measured verify cost and the request's "
                     "acceptance say pay off (default); static: --num-draft-tokens every step")
    add_drafter_flags(gen)
    gen.add_argument("--lossy", action="store_true", help="relaxed acceptance within a divergence budget (not exact)")
    gen.add_argument("--lossy-top-k", type=int, help="relax only tokens in the target's top k (0 = any; default 3)")
    gen.add_argument("--lossy-min-ratio", type=float, help="relax only if p(x) >= ratio * max p (default 0.3)")
    gen.add_argument("--lossy-budget", type=float, help="nats of divergence a request may spend (default 8)")
    gen.set_defaults(func=cmd_generate)
    add_serve_parsers(sub)
    add_up_parser(sub)
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
    from specserve.learned.train_draft import TRAIN_DEFAULTS, TrainDraftConfig, train_draft

    def given(**flags: object) -> dict[str, object]:  # flags left at None take the config's default
        return {name: value for name, value in flags.items() if value is not None}

    home = specserve_home(os.environ)
    config = TrainDraftConfig(
        model_path=resolve_model(args.model),
        train_dir=Path(args.train_data) if args.train_data else default_data_dir(os.environ) / "train",
        cache_dir=Path(args.data_dir) if args.data_dir else home / "distill",
        out=Path(args.out) if args.out else default_checkpoint_path(home, args.kind),
        distill=DistillConfig(**given(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                      temperature=args.distill_temperature)),
        train=replace(TRAIN_DEFAULTS[args.kind], loss=args.loss, device=args.device, **given(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every)),
        resume=args.resume,
        kind=args.kind,
        **given(draft_vocab_size=args.draft_vocab, medusa_heads=args.medusa_heads,
                draft_layers=layer_list(args.draft_layers), exit_layer=args.exit_layer),
    )
    print(json.dumps(asdict(train_draft(config))))
    return 0


def layer_list(text: str | None) -> tuple[int, ...] | None:
    """`--draft-layers 0,1,2,29` -> (0, 1, 2, 29); None stays None (the default)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidRequestError(f"--draft-layers: expected comma-separated layer numbers, got {text!r}") from None


def add_train_draft_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train-draft", help="self-distil a learned drafter from the target; prints one JSON "
                           "summary (corpus, vocabulary coverage, phase times, loss, held-out accuracy)")
    train.add_argument("--kind", choices=LEARNED_METHODS, default="eagle", help="drafter to train")
    train.add_argument("--out", help="checkpoint to write (default: the cache's drafters/KIND.safetensors)")
    train.add_argument("--model", help="target GGUF file or safetensors directory (default: SmolLM2-135M)")
    train.add_argument("--loss", choices=("hard", "soft", "unroll", "on-policy"), default="soft",
                       help="hard: CE on the target's tokens; soft: KL to the target's distribution; unroll (eagle "
                       "only): soft plus a second step on the head's own features (eagle adds feature regression); "
                       "on-policy (draft-model only): soft, and in the second half every other step on the draft "
                       "model's own responses scored by the target (DistillSpec)")
    train.add_argument("--medusa-heads", type=int, help="medusa: heads, each guessing one more token (default 4)")
    train.add_argument("--draft-layers", metavar="I,J,...",
                       help="draft-model: the target layers its layers start as, in order (default 0,1,2,3)")
    train.add_argument("--exit-layer", type=int, help="exit-head: the target layers the head reads after (default 4)")
    train.add_argument("--prompts", type=int, help="training prompts the target answers (default 1200)")
    train.add_argument("--max-new-tokens", type=int, help="most tokens of each response (default 256)")
    train.add_argument("--distill-temperature", type=float, help="the target's responses sampled at this "
                       "temperature, for drafters that serve sampling requests (default 0: greedy)")
    train.add_argument("--draft-vocab", type=int, help="draft vocabulary: the most frequent tokens (default 8192)")
    train.add_argument("--epochs", type=int, help="passes over the corpus (default: eagle 12, medusa 4, "
                       "draft-model 3, exit-head 4)")
    train.add_argument("--batch-size", type=int, help="sequences per optimizer step (default 8)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: eagle 5e-3, medusa 1e-3, "
                       "draft-model 5e-4, exit-head 1e-2)")
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
        "draft_checkpoints": {"eagle": Path(args.draft_checkpoint or default_checkpoint_path(home, "eagle")),
                              "medusa": Path(args.medusa_checkpoint or default_checkpoint_path(home, "medusa")),
                              "draft-model": Path(args.draft_model_checkpoint
                                                  or default_checkpoint_path(home, "draft-model")),
                              "exit-head": Path(args.exit_head_checkpoint
                                                or default_checkpoint_path(home, "exit-head"))},
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
        log("no docs/benchmarks.md here (not running from a checkout): printing only; --doc PATH writes one")
        return None
    return doc


def cmd_bench_spec(args: argparse.Namespace) -> int:
    from specserve.bench.spec import SpecBenchConfig, run_bench

    quick = {"per_category": 1, "max_tokens": 32} if args.quick else {}
    run_bench(SpecBenchConfig(**{**quick, **bench_fields(
        args, drafters=tuple(d for d in args.drafters.split(",") if d), per_category=args.per_category,
        max_tokens=args.max_tokens, hf=not args.no_hf, temperature=args.temperature,
    )}))
    return 0


def cmd_bench_lossy(args: argparse.Namespace) -> int:
    from specserve.bench.lossy import LossyBenchConfig, parse_settings, run_bench

    settings = parse_settings(args.lossy_settings) if args.lossy_settings is not None else None
    run_bench(LossyBenchConfig(**bench_fields(
        args, problems=args.problems, max_tokens=args.max_tokens, drafter=args.drafter,
        concurrency=args.concurrency, settings=settings, split=args.split,
    )))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    drafters = ",".join(m for m in SPEC_METHODS if m != "off")
    bench = sub.add_parser("bench", help="benchmarks: print markdown, rewrite their section of docs/benchmarks.md")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    spec = kinds.add_parser("spec", help="speculative decoding per Spec-Bench category (+ HumanEval, GSM8K) "
                            "against plain decoding and transformers; batch 1, greedy unless --temperature")
    spec.add_argument("--per-category", type=int, help="prompts per category (default 5)")
    spec.add_argument("--max-tokens", type=int, help="most new tokens per prompt (default 128)")
    spec.add_argument("--drafters", default="ngram,rest,auto", help=f"comma list of drafters to compare, of "
                      f"{drafters}; at --temperature > 0 a learned one as NAME:guess guesses instead of sampling")
    spec.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    spec.add_argument("--temperature", type=float, help="sample at this temperature with a fixed seed (default 0: "
                      "greedy); a sampled run writes its own section and skips the transformers baselines")
    spec.add_argument("--quick", action="store_true",
                      help="smoke run: 1 prompt per category, 32 tokens (--per-category / --max-tokens still win)")
    add_bench_flags(spec)
    spec.set_defaults(func=cmd_bench_spec)

    lossy = kinds.add_parser("lossy", help="lossy acceptance against lossless on GSM8K: accuracy, tok/s, tau")
    lossy.add_argument("--problems", type=int, help="the first N GSM8K problems of the split (default 200)")
    lossy.add_argument("--split", choices=("test", "train"),
                       help="GSM8K test problems (default) or train problems, for comparing settings without "
                       "looking at the test ones; each split has its own section of the doc")
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
    parser.add_argument("--medusa-checkpoint", help="checkpoint for the medusa drafter (default: the cache's "
                        "drafters/medusa.safetensors, made by `specserve train-draft --kind medusa`)")
    for kind in ("draft-model", "exit-head"):
        parser.add_argument(f"--{kind}-checkpoint", help=f"checkpoint for the {kind} drafter (default: the cache's "
                            f"drafters/{kind}.safetensors, made by `specserve train-draft --kind {kind}`)")
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
        log(f"specserve: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        log("specserve: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
