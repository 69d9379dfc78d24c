"""`specserve` command line: `generate` (one streamed generation, embedded mode) and `pull`.

Errors end with one line on stderr and a non-zero exit code (see specserve.errors); nothing below the
CLI reads the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from specserve.engine.config import WEIGHT_DTYPES, EngineConfig, SamplingParams
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
    load_start = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(model_path=resolve_model(args.model), dtype=args.dtype))
    load_seconds = time.perf_counter() - load_start
    prompt_ids = engine.encode_prompt(args.prompt, chat=not args.raw)
    start = time.perf_counter()
    first_token_at: float | None = None
    token_ids: list[int] = []
    text: list[str] = []
    finish_reason = None
    for out in engine.stream(prompt_ids, params):
        first_token_at = first_token_at or time.perf_counter()
        token_ids += out.new_token_ids
        text.append(out.text_delta)
        finish_reason = out.finish_reason
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
        _log(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s, {stats['tokens_per_s']:.1f} tok/s, "
             f"finish={finish_reason}, dtype={args.dtype}]")
    return 0


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
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None, help="makes sampled output reproducible")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print exactly one JSON object instead of streaming")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
