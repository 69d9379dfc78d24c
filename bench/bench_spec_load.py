"""Speculation under load in one engine: plain decoding against n-gram drafting with the static and the
cost-aware speculation budget (`SpecConfig.speculation_budget`), at several concurrencies, side by side.

`specserve bench spec` measures batch 1; here the same prompts run in waves of N concurrent requests
(one `generate` call per wave, a fresh engine each), greedy, up to --max-tokens new tokens each,
stopping at EOS. Systems alternate wave by wave and the whole pass runs twice, the second in reverse
order, so drift of the host falls on all of them alike. tok/s = new tokens / summed wall time.

    .venv/bin/python bench/bench_spec_load.py [--concurrency 1,4,16] [--dtypes float32,int8] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from specserve.bench.common import default_data_dir, default_doc_path, log, md_table, provenance_text, publish
from specserve.bench.spec import load_prompts
from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, SpecConfig
from specserve.engine.llm_engine import LLMEngine, build_model, load_tokenizer
from specserve.model_fetch import ensure_default_model, specserve_home

DOC_MARKERS = ("<!-- bench_spec_load:start -->", "<!-- bench_spec_load:end -->")
SYSTEMS = {
    "plain": SpecConfig(),
    "ngram, static budget": SpecConfig(method="ngram", speculation_budget="static"),
    "ngram, cost budget": SpecConfig(method="ngram", speculation_budget="cost"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=2, help="prompts per category (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most new tokens per prompt (default 128)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent requests per wave (default 1,4,16)")
    parser.add_argument("--dtypes", default="float32,int8", help="weight dtypes (default float32,int8)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    args.concurrency = [int(n) for n in args.concurrency.split(",")]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if args.per_category < 1 or args.max_tokens < 1 or min(args.concurrency) < 1:
        parser.error("--per-category, --max-tokens and every concurrency must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    load_average = os.getloadavg()[0]
    model_path = ensure_default_model(specserve_home(os.environ))
    tokenizer = load_tokenizer(str(model_path))
    prompts = [p.ids for p in load_prompts(default_data_dir(os.environ), args.per_category, tokenizer)]
    params = SamplingParams(max_tokens=args.max_tokens)
    blocks = sum(-(-(len(p) + args.max_tokens) // 16) for p in prompts) + 1
    rows = []
    for dtype in args.dtypes:
        model = build_model(str(model_path), dtype)
        for n in args.concurrency:
            log(f"{dtype}, {n} concurrent")
            waves = [prompts[i:i + n] for i in range(0, len(prompts), n)]
            seconds, tokens = dict.fromkeys(SYSTEMS, 0.0), dict.fromkeys(SYSTEMS, 0)
            for order in (list(SYSTEMS), list(SYSTEMS)[::-1]):
                for wave in waves:
                    for name in order:
                        config = EngineConfig(model_path=str(model_path), spec=SYSTEMS[name],
                                              cache=CacheConfig(num_blocks=blocks),
                                              scheduler=SchedulerConfig(max_num_seqs=n))
                        engine = LLMEngine(config, model, tokenizer)
                        start = time.perf_counter()
                        completions = engine.generate(wave, params)
                        seconds[name] += time.perf_counter() - start
                        tokens[name] += sum(len(c.token_ids) for c in completions)
            rates = {name: tokens[name] / seconds[name] for name in SYSTEMS}
            plain = rates["plain"]
            rows.append([dtype, str(n), *(f"{rates[s]:.1f}" for s in SYSTEMS),
                         *(f"{rates[s] / plain:.2f}x" for s in list(SYSTEMS)[1:])])
    headers = ["weights", "concurrent requests", *(f"{s} tok/s" for s in SYSTEMS),
               *(f"{s} vs plain" for s in list(SYSTEMS)[1:])]
    table = md_table(headers, rows)
    command = shlex.join([".venv/bin/python", "bench/bench_spec_load.py", *sys.argv[1:]])
    static = SYSTEMS["ngram, static budget"]
    section = f"""## Speculation under load, one engine (`bench/bench_spec_load.py`)

{provenance_text(command, load_average)}
- Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), weights as in the table, float32 KV cache.
- Prompts: the first {args.per_category} first-turn questions of each Spec-Bench category, then as many HumanEval
  tasks and GSM8K test questions ({len(prompts)} in all), chat template applied; greedy, up to {args.max_tokens} new
  tokens, stopping at EOS.
- Method: waves of N concurrent requests (one `generate` call and a fresh engine each); the systems
  alternate wave by wave, twice over, the second pass in reverse order. Static budget: at most
  {static.num_draft_tokens} nodes per sequence, {static.max_draft_tokens_per_step} per step shared out;
  cost budget: the same ceiling, nodes priced by the engine's measured verify-row cost and each
  request's acceptance (engine/draft_budget.py).

{table}"""
    publish(table, section, None if args.no_write else default_doc_path(), DOC_MARKERS)


if __name__ == "__main__":
    main()
