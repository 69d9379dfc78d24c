"""How far copy-based (training-free) drafting can go on this model: tau ceilings replayed over greedy outputs.

Generates the plain greedy output of every prompt of `specserve bench spec` (same prompts, same token
limit, stopping at EOS), then replays drafters over those outputs (services/bench/copy_ceiling.py): the
bounds "any copy", "best suffix match" and "most recent match", and specserve's n-gram drafter itself,
at each drafted-token budget. Writes its table into docs/benchmarks.md. No timing: tau only, so the
numbers do not depend on the machine (float32 greedy output is the same on every host up to float
rounding of near-ties).

    .venv/bin/python bench/bench_copy_ceiling.py [--per-category 4] [--budgets 5,16] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections import defaultdict
from datetime import datetime, timezone

from specserve.bench.common import default_data_dir, default_doc_path, log, md_table, publish
from specserve.bench.copy_ceiling import DRAFTERS, replay, tree_drafter
from specserve.bench.spec import EXTRA_SETS, SPEC_BENCH_MIX, load_prompts
from specserve.drafters.ngram import NgramDrafter
from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams
from specserve.engine.llm_engine import LLMEngine, build_model, load_tokenizer
from specserve.model_fetch import ensure_default_model, specserve_home

DOC_MARKERS = ("<!-- bench_copy_ceiling:start -->", "<!-- bench_copy_ceiling:end -->")
NGRAM = "specserve ngram"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=4, help="prompts per category (default 4)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most new tokens per prompt (default 128)")
    parser.add_argument("--budgets", default="5,16", help="drafted tokens per step to replay (default 5,16)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    if args.per_category < 1 or args.max_tokens < 1 or min(args.budgets) < 1:
        parser.error("--per-category, --max-tokens and every budget must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    model_path = ensure_default_model(specserve_home(os.environ))
    tokenizer = load_tokenizer(str(model_path))
    prompts = load_prompts(default_data_dir(os.environ), args.per_category, tokenizer)
    log(f"greedy outputs of {len(prompts)} prompts")
    # float32 linears and attention are batch-invariant: one batched run gives every prompt's batch-1 output.
    blocks = sum(-(-(len(p.ids) + args.max_tokens) // 16) for p in prompts) + 1
    engine = LLMEngine(EngineConfig(model_path=str(model_path), cache=CacheConfig(16, blocks)),
                       build_model(str(model_path), "float32"), tokenizer)
    params = SamplingParams(max_tokens=args.max_tokens)
    outputs = [c.token_ids for c in engine.generate([p.ids for p in prompts], params)]

    systems = [*DRAFTERS, NGRAM]
    # (label, budget, system) -> [output tokens, target steps]
    counts: dict[tuple[str, int, str], list[int]] = defaultdict(lambda: [0, 0])
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        for budget in args.budgets:
            for system in systems:
                ngram = NgramDrafter() if system == NGRAM else None
                drafter = tree_drafter(ngram, i, len(prompt.ids)) if ngram else DRAFTERS[system]
                steps = replay(prompt.ids, output, drafter, budget)
                for label in (prompt.category, SPEC_BENCH_MIX if prompt.category not in EXTRA_SETS else None):
                    if label is not None:
                        counts[label, budget, system][0] += len(output)
                        counts[label, budget, system][1] += steps
        log(f"replayed {i + 1}/{len(prompts)}")

    labels = list(dict.fromkeys(p.category for p in prompts)) + [SPEC_BENCH_MIX]
    headers = ["category", *[f"{s} tau (budget {b})" for b in args.budgets for s in systems]]
    rows = [[f"**{label}**" if label == SPEC_BENCH_MIX else label,
             *[f"{counts[label, b, s][0] / counts[label, b, s][1]:.2f}" for b in args.budgets for s in systems]]
            for label in labels]
    table = md_table(headers, rows)
    command = shlex.join([".venv/bin/python", "bench/bench_copy_ceiling.py", *sys.argv[1:]])
    section = f"""## How far copying can go: tau ceilings of training-free drafting (`bench/bench_copy_ceiling.py`)

- Command: `{command}`, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.
- Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), weights float32, greedy, up to {args.max_tokens} new
  tokens, stopping at EOS: the outputs lossless speculation reproduces.
- Prompts: those of `specserve bench spec --per-category {args.per_category}` ({len(prompts)} in all).
- Method: each drafter is replayed over the known greedy output; a step accepts the drafted tokens that
  match the output (the longest matching path of a tree) plus the target's own token; tau = output tokens /
  steps. "any copy": the longest start of the true continuation found anywhere in the prompt or the
  output so far (a bound for every drafter that copies from the request's own text); "best suffix
  match": the best continuation after an earlier occurrence of the last 1-4 tokens (a suffix-keyed
  drafter with a perfect pick); "most recent match": the continuation after the most recent occurrence
  of the longest matching suffix (prompt lookup); "{NGRAM}": drafters/ngram.py's tree. Budget: drafted
  tokens per step (tree nodes for the n-gram drafter). No timing.

{table}
"""
    publish(table, section, None if args.no_write else default_doc_path(), DOC_MARKERS)


if __name__ == "__main__":
    main()
