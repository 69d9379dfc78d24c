"""Prefill attention on the CPU: specserve's C++ prefill kernel against torch SDPA, side by side.

The prompts and chunking of the engine benchmark (its 20 Spec-Bench prompts, the scheduler's token budget
per step): the prompts one at a time (batch 1), and the throughput workload's first 8 as one wave, chunked
as the scheduler does (first come first served, the last chunk of a step split); and a conversation's later
turns, short chunks after a long cached prefix. Each step's attention
over a paged float32 cache is timed three ways: SDPA on gathered keys in float32 (the "cpu" backend's path
for chunks over 16 tokens until the prefill kernel), SDPA in bfloat16 (what bfloat16 and int8 models use
on AMX hosts), and the "cpu" backend as the engine runs it (kernels/csrc/prefill_attention_cpu.cpp for those
chunks). The model's shapes (heads, KV heads, head_dim, layers) with random values; ms = one layer's time
(best of --repeats) summed over steps, times the number of layers.

    .venv/bin/python bench/bench_prefill_attention.py [--repeats 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable

import torch

from specserve.bench.common import (
    chat_ids, default_doc_path, log, md_table, provenance_text, publish, select_questions,
)
from specserve.engine.config import ModelConfig, SchedulerConfig
from specserve.engine.llm_engine import load_tokenizer
from specserve.engine.loader import load_config
from specserve.kernels.paged_attention import (
    build_attention_metadata, paged_attention, paged_attention_ref, prefill_kernel_applies,
)
from specserve.model_fetch import ensure_default_model, specserve_home

DOC_MARKERS = ("<!-- bench_prefill_attention:start -->", "<!-- bench_prefill_attention:end -->")
BLOCK_SIZE = 16
WAVE = 8  # the engine benchmark's concurrency the throughput target names
# A later turn of a conversation whose earlier turns are in the prefix cache: short chunks, long context.
TURN_PREFIX, TURN_LENGTHS = 2000, (17, 40, 100)

Step = list[tuple[int, int]]  # one engine step's chunks: (tokens already in the cache, new tokens)


def wave_steps(lengths: list[int], budget: int) -> list[Step]:
    """The prefill steps of prompts that arrive together: each step fills `budget` tokens in arrival order,
    splitting the last chunk. Example: lengths [300, 400], budget 512 -> [[(0, 300), (0, 212)], [(212, 188)]]."""
    steps: list[Step] = []
    done = [0] * len(lengths)
    while any(d < n for d, n in zip(done, lengths)):
        room, step = budget, []
        for i, n in enumerate(lengths):
            take = min(room, n - done[i])
            if take > 0:
                step.append((done[i], take))
                done[i] += take
                room -= take
        steps.append(step)
    return steps


class StepCase:
    """One step's chunks in a paged float32 cache (blocks shuffled) with random K, V and queries."""

    def __init__(self, step: Step, config: ModelConfig, gen: torch.Generator) -> None:
        contexts = [done + new for done, new in step]
        blocks = [-(-c // BLOCK_SIZE) for c in contexts]
        order = torch.randperm(sum(blocks), generator=gen).tolist()
        tables, used = [], 0
        for n in blocks:
            tables.append(order[used:used + n])
            used += n
        shape = (sum(blocks) * BLOCK_SIZE, config.num_kv_heads, config.head_dim)
        self.k, self.v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        self.q = torch.randn(sum(new for _, new in step), config.num_heads, config.head_dim, generator=gen)
        self.scale = config.head_dim**-0.5
        query_lens = [new for _, new in step]
        self.metas = {backend: build_attention_metadata(query_lens, contexts, tables, BLOCK_SIZE, backend=backend)
                      for backend in ("torch", "cpu")}

    def ways(self) -> dict[str, Callable[[], torch.Tensor]]:
        args, torch_meta = (self.q, self.k, self.v), self.metas["torch"]
        return {
            "SDPA float32": lambda: paged_attention_ref(*args, torch_meta, self.scale),
            "SDPA bfloat16": lambda: paged_attention_ref(*args, torch_meta, self.scale, torch.bfloat16),
            "cpu backend": lambda: paged_attention(*args, self.metas["cpu"], self.scale),
        }


def best_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def useful_gflop(step: Step, config: ModelConfig) -> float:
    """Causal attention's multiply-adds x 2 (QK^T and PV), per layer: each new row sees its prefix and itself."""
    keys = sum(new * done + new * (new + 1) / 2 for done, new in step)
    return 4 * config.num_heads * config.head_dim * keys / 1e9


def time_workload(name: str, steps: list[Step], config: ModelConfig, repeats: int) -> tuple[list[str], float]:
    gen = torch.Generator().manual_seed(0)
    totals: dict[str, float] = {}
    worst = 0.0
    for step in steps:
        case = StepCase(step, config, gen)
        ways = case.ways()
        worst = max(worst, (ways["cpu backend"]() - ways["SDPA float32"]()).abs().max().item())
        for way, fn in ways.items():
            totals[way] = totals.get(way, 0.0) + best_seconds(fn, repeats)
    layers, gflop = config.num_layers, sum(useful_gflop(s, config) for s in steps)
    tokens = sum(new for step in steps for _, new in step)
    ms = {way: 1e3 * seconds * layers for way, seconds in totals.items()}
    row = [name, str(len(steps)), str(tokens), *(f"{v:.1f}" for v in ms.values()),
           f"{ms['SDPA float32'] / ms['cpu backend']:.2f}x", f"{ms['SDPA bfloat16'] / ms['cpu backend']:.2f}x",
           f"{gflop / totals['cpu backend']:.0f}"]
    return row, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timings per step and way; the best counts")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    load_average = os.getloadavg()[0]
    model_path = ensure_default_model(specserve_home(os.environ))
    config, tokenizer = load_config(model_path), load_tokenizer(str(model_path))
    lengths = [len(chat_ids(tokenizer, q["turns"][0])) for q in select_questions(20)]
    budget = SchedulerConfig().max_num_batched_tokens
    workloads = {
        f"batch 1: {len(lengths)} prompts, one at a time": [s for n in lengths for s in wave_steps([n], budget)],
        f"a wave of {WAVE}: the throughput workload's first {WAVE}": wave_steps(lengths[:WAVE], budget),
        f"{', '.join(map(str, TURN_LENGTHS))} new tokens after a cached {TURN_PREFIX}-token prefix, one at a time":
            [[(TURN_PREFIX, n)] for n in TURN_LENGTHS],
    }
    log(f"prefill kernel applies here: {prefill_kernel_applies(config.head_dim)}")
    rows, worst = [], 0.0
    for name, steps in workloads.items():
        log(name)
        row, error = time_workload(name, steps, config, args.repeats)
        rows.append(row)
        worst = max(worst, error)
    headers = ["prefill", "steps", "prompt tokens", "SDPA float32 ms", "SDPA bfloat16 ms", "cpu backend ms",
               "vs SDPA float32", "vs SDPA bfloat16", "cpu backend GFLOP/s"]
    table = md_table(headers, rows)
    command = shlex.join([".venv/bin/python", "bench/bench_prefill_attention.py", *sys.argv[1:]])
    shapes = (f"{config.num_heads} query heads, {config.num_kv_heads} KV heads, head_dim {config.head_dim}, "
              f"{config.num_layers} layers")
    applies = "yes" if prefill_kernel_applies(config.head_dim) else "no, so it is SDPA float32 again"
    section = f"""## Prefill attention: C++ kernel vs SDPA (`bench/bench_prefill_attention.py`)

{provenance_text(command, load_average)}
- Shapes: {shapes} (SmolLM2-135M); float32 paged cache, block size {BLOCK_SIZE}, random values.
  Prompt lengths: the engine benchmark's {len(lengths)} Spec-Bench prompts with the chat template
  ({min(lengths)}-{max(lengths)} tokens), chunked by the scheduler's {budget}-token step budget; the last row's chunks
  follow {TURN_PREFIX} tokens already in the cache.
- ms: each step's attention for one layer (best of {args.repeats}), summed over the steps, x {config.num_layers} layers.
  "cpu backend" is what the engine runs: the prefill kernel for chunks over 16 tokens where it applies
  (here: {applies}), the tree kernel for shorter ones.
  GFLOP/s counts causal attention's useful work only. Largest difference between the cpu backend's and
  SDPA float32's outputs: {worst:.1e}.

{table}"""
    publish(table, section, None if args.no_write else default_doc_path(), DOC_MARKERS)


if __name__ == "__main__":
    main()
