"""Speculative decoding benchmark on CPU: per Spec-Bench category (plus HumanEval and a GSM8K slice),
tok/s and tau of each drafter against specserve plain decoding, transformers `generate`, and transformers'
own prompt-lookup assisted generation on the same prompts. Greedy, batch 1.

Prints a markdown table and replaces its section of docs/benchmarks.md (unless --no-write).
Run: .venv/bin/python bench/bench_spec.py [--quick] [--no-write]   (see --help)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean

import torch

from bench_engine import REPO_ROOT, data_dir, log, machine_text, md_table, write_doc
from specserve.drafters.datastore import default_datastore_path
from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams, SpecConfig
from specserve.engine.llm_engine import LLMEngine, build_model, load_tokenizer
from specserve.engine.verify import SpecStats
from specserve.model_fetch import ensure_default_model, specserve_home

DOC_START, DOC_END = "<!-- bench_spec:start -->", "<!-- bench_spec:end -->"
BLOCK_SIZE = 16
HF_SYSTEMS = {"hf": "transformers", "hf-pld": "transformers prompt lookup"}
PLAIN = "specserve plain"


@dataclass
class Prompt:
    category: str
    ids: list[int]


@dataclass
class Run:
    tokens: int
    seconds: float
    forwards: int  # target forwards (tau = tokens / forwards); 0 when the system does not say


def load_prompts(per_category: int, tokenizer) -> list[Prompt]:
    """`per_category` first-turn questions of every Spec-Bench category, then HumanEval and GSM8K (test)."""
    def chat(text: str) -> list[int]:
        return tokenizer.render_prompt_ids([{"role": "user", "content": text}])

    by_category: dict[str, list[str]] = defaultdict(list)
    with open(data_dir() / "spec_bench" / "question.jsonl") as f:
        for line in f:
            q = json.loads(line)
            by_category[q["category"]].append(q["turns"][0])
    prompts = [Prompt(c, chat(t)) for c, texts in sorted(by_category.items()) for t in texts[:per_category]]
    with gzip.open(data_dir() / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        tasks = [json.loads(line)["prompt"] for line in f][:per_category]
    prompts += [Prompt("humaneval", chat(f"Complete this Python function.\n\n{t}")) for t in tasks]
    gsm8k = next((data_dir() / "gsm8k").glob("*.jsonl"))
    with open(gsm8k) as f:
        questions = [json.loads(line)["question"] for line in f][:per_category]
    prompts += [Prompt("gsm8k", chat(q)) for q in questions]
    return prompts


def specserve_runner(model, tokenizer, model_path: Path, spec: SpecConfig, max_tokens: int) -> Callable:
    params = SamplingParams(max_tokens=max_tokens)

    def run(ids: list[int]) -> Run:
        num_blocks = -(-(len(ids) + max_tokens + spec.num_draft_tokens + 1) // BLOCK_SIZE) + 1
        config = EngineConfig(model_path=str(model_path), spec=spec, cache=CacheConfig(BLOCK_SIZE, num_blocks))
        engine = LLMEngine(config, model, tokenizer)
        start = time.perf_counter()
        completion = engine.generate([ids], params)[0]
        seconds = time.perf_counter() - start
        stats: SpecStats = completion.spec
        return Run(len(completion.token_ids), seconds, stats.forwards)

    return run


def hf_runner(model_path: Path, max_tokens: int, prompt_lookup: bool, eos_ids: tuple[int, ...]) -> Callable:
    from transformers import AutoModelForCausalLM  # a benchmark reference only

    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    model.eval()
    extra = {"prompt_lookup_num_tokens": 10} if prompt_lookup else {}

    def run(ids: list[int]) -> Run:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                max_new_tokens=max_tokens, pad_token_id=0, eos_token_id=list(eos_ids), **extra,
            )
        return Run(out.shape[1] - len(ids), time.perf_counter() - start, 0)

    return run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=5, help="prompts per category (default 5)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--drafters", default="ngram,rest,auto", help="comma list of specserve drafters")
    parser.add_argument("--datastore", help="retrieval datastore (default: the cache's default.npz, built by "
                        "`specserve datastore build ../shared/data/train/*.jsonl`)")
    parser.add_argument("--num-draft-tokens", type=int, default=SpecConfig.num_draft_tokens)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 prompt per category, 32 tokens")
    args = parser.parse_args()
    if args.quick:
        args.per_category, args.max_tokens = 1, 32
    args.drafters = [d for d in args.drafters.split(",") if d]
    return args


def time_system(name: str, run: Callable, prompts: list[Prompt]) -> list[Run]:
    log(f"{name}: {len(prompts)} prompts")
    run(prompts[0].ids)  # warm-up
    return [run(p.ids) for p in prompts]


SPEC_BENCH_MIX = "Spec-Bench mix"
EXTRA_SETS = ("humaneval", "gsm8k")  # not Spec-Bench categories: reported, but left out of the mix


def rates(systems: dict[str, list[Run]], prompts: list[Prompt]) -> dict[str, dict[str, tuple[float, float]]]:
    """row label -> system -> (tok/s, tau); tau is 0 for systems that do not report forwards."""
    categories = sorted({p.category for p in prompts}, key=lambda c: (c in EXTRA_SETS, c))
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for label in [*categories, SPEC_BENCH_MIX]:
        idx = [i for i, p in enumerate(prompts)
               if (p.category not in EXTRA_SETS if label == SPEC_BENCH_MIX else p.category == label)]
        table[label] = {}
        for name, runs in systems.items():
            tokens, forwards = sum(runs[i].tokens for i in idx), sum(runs[i].forwards for i in idx)
            table[label][name] = (tokens / sum(runs[i].seconds for i in idx), tokens / forwards if forwards else 0.0)
    return table


def table(by_row: dict[str, dict[str, tuple[float, float]]]) -> str:
    systems = list(next(iter(by_row.values())))
    drafters = [s for s in systems if s.startswith("specserve ") and s != PLAIN]
    has_hf = HF_SYSTEMS["hf"] in systems
    headers = ["category", *[f"{s} tok/s" for s in systems], *[f"{s} vs plain" for s in drafters]]
    headers += [f"{s} vs transformers" for s in [PLAIN, *drafters]] if has_hf else []
    headers += [f"{s} tau" for s in drafters]
    rows = []
    for label, by_system in by_row.items():
        rate = {s: v[0] for s, v in by_system.items()}
        row = [f"**{label}**" if label == SPEC_BENCH_MIX else label, *[f"{rate[s]:.1f}" for s in systems]]
        row += [f"{rate[s] / rate[PLAIN]:.2f}x" for s in drafters]
        row += [f"{rate[s] / rate[HF_SYSTEMS['hf']]:.2f}x" for s in [PLAIN, *drafters]] if has_hf else []
        row += [f"{by_system[s][1]:.2f}" for s in drafters]
        rows.append(row)
    return md_table(headers, rows)


def targets_text(by_row: dict[str, dict[str, tuple[float, float]]]) -> str:
    """The issue's targets for the best training-free drafter, checked against the table."""
    drafters = [s for s in next(iter(by_row.values())) if s.startswith("specserve ") and s != PLAIN]
    if not drafters:
        return ""

    lines = []
    for label, goal in ((SPEC_BENCH_MIX, 1.8), ("summarization", 2.5), ("rag", 2.5)):
        line = f"- best drafter >= {goal}x plain decoding on {label}: "
        if label not in by_row:
            lines.append(line + "not measured in this run")
            continue
        speedups = {s: by_row[label][s][0] / by_row[label][PLAIN][0] for s in drafters}
        name = max(speedups, key=speedups.get)
        lines.append(line + f"{name} {speedups[name]:.2f}x, {'met' if speedups[name] >= goal else 'NOT met'}")
    return "Targets of the issue, checked against the numbers above:\n\n" + "\n".join(lines)


def main() -> None:
    args = parse_args()
    load_average = os.getloadavg()[0]
    model_path = ensure_default_model(specserve_home(os.environ))
    tokenizer = load_tokenizer(str(model_path))
    prompts = load_prompts(args.per_category, tokenizer)
    model = build_model(str(model_path), args.dtype)
    systems: dict[str, list[Run]] = {}
    runners = {PLAIN: specserve_runner(model, tokenizer, model_path, SpecConfig(), args.max_tokens)}
    datastore = args.datastore or str(default_datastore_path(specserve_home(os.environ)))
    for drafter in args.drafters:
        spec = SpecConfig(method=drafter, num_draft_tokens=args.num_draft_tokens,
                          datastore_path=None if drafter == "ngram" else datastore)
        runners[f"specserve {drafter}"] = specserve_runner(model, tokenizer, model_path, spec, args.max_tokens)
    if not args.no_hf:
        for key, label in HF_SYSTEMS.items():
            runners[label] = hf_runner(model_path, args.max_tokens, key == "hf-pld", tokenizer.eos_token_ids)
    for name, run in runners.items():
        systems[name] = time_system(name, run, prompts)
    by_row = rates(systems, prompts)
    result = f"{table(by_row)}\n\n{targets_text(by_row)}"
    print(result, flush=True)
    if not args.no_write:
        write_doc(doc_section(args, load_average, len(prompts), result), DOC_START, DOC_END)
        print("\nwrote docs/benchmarks.md")


def doc_section(args: argparse.Namespace, load_average: float, num_prompts: int, result: str) -> str:
    python = Path(sys.executable)
    shown = python.relative_to(REPO_ROOT) if python.is_relative_to(REPO_ROOT) else python
    command = shlex.join([str(shown), "bench/bench_spec.py", *sys.argv[1:]])
    return f"""## Speculative decoding, batch 1 (`bench/bench_spec.py`)

- Command: `{command}`, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.
- Machine: {machine_text()}. One-minute load average at start: {load_average:.2f}.
- Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), specserve weights {args.dtype}; transformers float32.
- Prompts: the first {args.per_category} first-turn questions of each Spec-Bench category, the first
  {args.per_category} HumanEval tasks and GSM8K test questions ({num_prompts} in all), chat template applied.
- Method: greedy, batch 1, up to {args.max_tokens} new tokens, stopping at EOS (the same for every system:
  speculation is lossless, so outputs match plain decoding). tok/s = new tokens / wall time, prefill
  included; a fresh engine per prompt (no prefix cache carried over); one warm-up prompt per system.
  tau = tokens per target forward. Drafters verify up to {args.num_draft_tokens} drafted tokens a step;
  rest and auto retrieve from a datastore of the training corpora (`../shared/data/train/*.jsonl`, no
  benchmark prompt), built with `specserve datastore build`.
  transformers prompt lookup: `generate(prompt_lookup_num_tokens=10)`.

{result}"""


if __name__ == "__main__":
    main()
