"""Engine benchmark on CPU: batch-1 speed against transformers (and llama.cpp when installed), throughput
under concurrency, int8/bfloat16 quality against float32, and where one decode step spends its time.

Prints markdown tables and replaces its section of docs/benchmarks.md (unless --no-write).
Run: .venv/bin/python bench/bench_engine.py [--quick] [--no-write]   (see --help)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
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
import torch.nn.functional as F
from torch import nn

from specserve.bench.common import default_data_dir, log, machine_text, md_table, select_questions, write_doc
from specserve.drafters.base import common_prefix_len
from specserve.engine.config import KV_DTYPES, CacheConfig, EngineConfig, SamplingParams
from specserve.engine.llm_engine import LLMEngine, build_model, load_tokenizer
from specserve.engine.model import Attention, LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.engine.quant import BF16Linear, Float32Linear, Int8Linear, PackedLinear
from specserve.engine.tokenizer import Tokenizer
from specserve.kernels.paged_attention import build_attention_metadata, resolve_attention_backend
from specserve.model_fetch import ensure_default_model, specserve_home

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
DOC_START, DOC_END = "<!-- bench_engine:start -->", "<!-- bench_engine:end -->"

SYSTEMS = {  # --systems name -> label
    "hf": "transformers float32",
    "fp32": "specserve float32",
    "bf16": "specserve bfloat16",
    "int8": "specserve int8",
    "llamacpp": "llama.cpp (Q4_1)",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}  # the specserve systems' weight dtypes
WARMUP_QUESTION = "Write two sentences about the sea."  # warms up the batched shapes before throughput runs
BLOCK_SIZE = 16
PPL_TOKENS, PPL_CHUNK = 2048, 512
PROFILE_WARMUP_STEPS, PROFILE_STEPS = 8, 32
KV_CONCURRENCY = 8  # the waves the KV cache table times
LINEAR_TYPES = (nn.Linear, BF16Linear, Float32Linear, Int8Linear, PackedLinear)


@dataclass
class Prompt:
    question_id: int
    category: str
    ids: list[int]


@dataclass
class Run:
    token_ids: list[int]
    seconds: float  # wall time of the whole generation, prefill included

    @property
    def tok_per_s(self) -> float:
        return len(self.token_ids) / self.seconds


@dataclass
class Bench:
    """What every measurement shares: flags, the checkpoint, tokenizer, loaded specserve models, prompts."""

    args: argparse.Namespace
    model_path: Path
    tokenizer: Tokenizer
    models: dict[str, LlamaModel]  # system -> model, for the specserve systems selected
    prompts: list[Prompt]
    warmup_ids: list[int]


Generate = Callable[[list[int]], list[int]]  # prompt ids -> exactly max_tokens greedy new token ids


def perplexity_text_ids(tokenizer: Tokenizer) -> list[int]:
    """First PPL_TOKENS tokens of GSM8K-train question/answer pairs (a corpus no benchmark prompt uses)."""
    ids: list[int] = []
    with open(default_data_dir(os.environ) / "train" / "gsm8k_train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            text = f"Question: {row['question']}\nAnswer: {row['answer']}\n\n"
            ids += tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= PPL_TOKENS:
                break
    return ids[:PPL_TOKENS]


def fresh_engine(bench: Bench, system: str, prompts: list[list[int]], max_tokens: int,
                 kv_dtype: str = "float32") -> LLMEngine:
    """An engine with an empty prefix cache, sized to `prompts`: every timed run prefills its whole prompt."""
    num_blocks = sum(-(-(len(p) + max_tokens) // BLOCK_SIZE) for p in prompts) + 1
    config = EngineConfig(model_path=str(bench.model_path), cache=CacheConfig(BLOCK_SIZE, num_blocks, kv_dtype))
    return LLMEngine(config, bench.models[system], bench.tokenizer)


def specserve_generate(bench: Bench, system: str, kv_dtype: str = "float32") -> Generate:
    params = SamplingParams(max_tokens=bench.args.max_tokens, ignore_eos=True)
    def generate(ids: list[int]) -> list[int]:
        return fresh_engine(bench, system, [ids], params.max_tokens, kv_dtype).generate([ids], params)[0].token_ids

    return generate


def hf_generate(bench: Bench) -> Generate:
    from transformers import AutoModelForCausalLM  # a test and benchmark reference only

    path, max_tokens = bench.model_path, bench.args.max_tokens
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    def generate(ids: list[int]) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0,
            )
        return out[0, len(ids):].tolist()

    return generate


def llamacpp_generate(bench: Bench) -> Generate:
    from llama_cpp import Llama

    llm = Llama(model_path=str(bench.model_path), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)

    def generate(ids: list[int]) -> list[int]:
        llm.reset()  # no KV reuse from the previous prompt
        # `Llama.generate` yields tokens without ever stopping on EOS; top_k=1 / temp=0 is greedy.
        tokens = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        return list(itertools.islice(tokens, bench.args.max_tokens))

    return generate


def time_batch1(bench: Bench, generate: Generate) -> list[Run]:
    # Warm up on the longest prompt: a first long prefill pays one-off allocation costs (transformers lost
    # half its speed on its first ~700-token prompt after a short warm-up). No run reuses another's KV.
    generate(max((p.ids for p in bench.prompts), key=len))
    runs = []
    for prompt in bench.prompts:
        start = time.perf_counter()
        token_ids = generate(prompt.ids)
        runs.append(Run(token_ids, time.perf_counter() - start))
        assert len(token_ids) == bench.args.max_tokens, f"expected {bench.args.max_tokens} tokens, got {len(token_ids)}"
    return runs


def run_batch1(bench: Bench) -> dict[str, list[Run]]:
    runs = {}
    for system in bench.args.systems:
        log(f"batch 1: {SYSTEMS[system]}")
        if system in DTYPES:
            generate = specserve_generate(bench, system)
        else:
            generate = hf_generate(bench) if system == "hf" else llamacpp_generate(bench)
        runs[system] = time_batch1(bench, generate)
    return runs


def waves_tok_per_s(bench: Bench, system: str, workload: list[list[int]], concurrency: int,
                    kv_dtype: str = "float32") -> float:
    """Run `workload` in waves of `concurrency` prompts (one `generate` call each); new tokens / wall time."""
    params = SamplingParams(max_tokens=bench.args.max_tokens, ignore_eos=True)
    seconds = 0.0
    for i in range(0, len(workload), concurrency):
        wave = workload[i:i + concurrency]
        engine = fresh_engine(bench, system, wave, params.max_tokens, kv_dtype)
        start = time.perf_counter()
        engine.generate(wave, params)
        seconds += time.perf_counter() - start
    return len(workload) * params.max_tokens / seconds


def run_throughput(bench: Bench, runs: dict[str, list[Run]]) -> dict[str, dict[int, float]]:
    """Aggregate tok/s by concurrency; concurrency 1 sums the batch-1 runs of the same prompts."""
    size = max(bench.args.concurrency)
    workload = [p.ids for p in itertools.islice(itertools.cycle(bench.prompts), size)]
    warmup = SamplingParams(max_tokens=8, ignore_eos=True)
    aggregate = {}
    for system in DTYPES:
        if system not in bench.models:
            continue
        log(f"throughput: {SYSTEMS[system]}")
        serial_seconds = sum(runs[system][i % len(bench.prompts)].seconds for i in range(size))
        aggregate[system] = {1: size * bench.args.max_tokens / serial_seconds}
        for n in bench.args.concurrency[1:]:
            fresh_engine(bench, system, [bench.warmup_ids] * n, 8).generate([bench.warmup_ids] * n, warmup)
            aggregate[system][n] = waves_tok_per_s(bench, system, workload, n)
    return aggregate


@dataclass
class KvRun:
    """One (weights, KV cache dtype) pair: batch-1 runs, the waves' aggregate, perplexity."""

    runs: list[Run]
    aggregate: float  # tok/s at KV_CONCURRENCY concurrent sequences
    ppl: float


def run_kv_dtypes(bench: Bench) -> dict[tuple[str, str], KvRun]:
    """The specserve systems again with each other KV cache dtype: batch 1 on the same prompts, waves of
    KV_CONCURRENCY on the throughput workload, perplexity on the same text."""
    size = max(bench.args.concurrency)
    workload = [p.ids for p in itertools.islice(itertools.cycle(bench.prompts), size)]
    ppl_ids = perplexity_text_ids(bench.tokenizer)
    results = {}
    for system in (s for s in DTYPES if s in bench.models):
        for kv_dtype in (k for k in bench.args.kv_dtypes if k != "float32"):
            log(f"KV cache {kv_dtype}: {SYSTEMS[system]}")
            runs = time_batch1(bench, specserve_generate(bench, system, kv_dtype))
            aggregate = waves_tok_per_s(bench, system, workload, KV_CONCURRENCY, kv_dtype)
            results[system, kv_dtype] = KvRun(runs, aggregate, perplexity(bench.models[system], ppl_ids, kv_dtype))
    return results


def all_logits(model: LlamaModel, ids: list[int], kv_dtype: str = "float32") -> torch.Tensor:
    """Logits `# [len(ids), vocab]` at every position of one sequence, prefilled in one forward (whose
    attention reads K/V back from the cache, as stored in `kv_dtype`)."""
    n, num_blocks = len(ids), -(-len(ids) // BLOCK_SIZE)
    kv = allocate_kv_cache(model.config, CacheConfig(BLOCK_SIZE, num_blocks), getattr(torch, kv_dtype))
    meta = build_attention_metadata([n], [n], [list(range(num_blocks))], BLOCK_SIZE)
    return model(torch.tensor(ids), torch.arange(n), kv, meta, torch.arange(n))[0]


def perplexity(model: LlamaModel, ids: list[int], kv_dtype: str = "float32") -> float:
    """exp(mean next-token NLL) over independent PPL_CHUNK-token chunks (no context across chunks)."""
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, PPL_CHUNK):
        chunk = ids[i:i + PPL_CHUNK]
        logits = all_logits(model, chunk, kv_dtype)[:-1]
        nll += F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def watch_modules(model: LlamaModel, layers: bool = True) -> tuple[dict[str, float], list]:
    """Seconds inside the model and (`layers`) its Attention modules and the linears in / outside attention,
    accumulated by forward pre/post hooks (CPU ops run synchronously). Returns the totals and the hook
    handles."""
    seconds: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}

    def watch(module: nn.Module, label: str) -> list:
        def pre(m: nn.Module, args: tuple) -> None:
            started[id(m)] = time.perf_counter()

        def post(m: nn.Module, args: tuple, out: object) -> None:
            seconds[label] += time.perf_counter() - started.pop(id(m))

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    handles = watch(model, "forward")
    for name, module in model.named_modules() if layers else ():
        if isinstance(module, Attention):
            handles += watch(module, "attention")
        elif isinstance(module, LINEAR_TYPES):
            handles += watch(module, "attn_linear" if ".self_attn." in name else "linear")
    return seconds, handles


def profile_decode(bench: Bench, system: str) -> dict[str, float]:
    """Mean milliseconds per batch-1 decode step as the engine runs it (decoder layers fused into one C++
    call where the model allows), then the same steps through the per-layer modules, split into parts by
    hooks on them (the fused call has no parts to hook)."""
    model = bench.models[system]
    ids, max_tokens = bench.prompts[0].ids, 1 + 2 * (PROFILE_WARMUP_STEPS + PROFILE_STEPS)
    engine = fresh_engine(bench, system, [ids], max_tokens)
    engine.add_request(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    while not engine.step():  # prefill (possibly chunked) up to the first token
        pass
    ms: dict[str, float] = {}
    for fused in (True, False):
        model.fuse_layers = fused
        for _ in range(PROFILE_WARMUP_STEPS):
            engine.step()
        seconds, handles = watch_modules(model, layers=not fused)
        start = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            engine.step()
        seconds["step"] = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        run = {k: 1000 * v / PROFILE_STEPS for k, v in seconds.items()}
        if fused:
            ms.update(step=run["step"], forward=run["forward"], bookkeeping=run["step"] - run["forward"])
        else:
            linear, attention = run["linear"] + run["attn_linear"], run["attention"] - run["attn_linear"]
            ms.update(layered_forward=run["forward"], linear=linear, attention=attention,
                      other=run["forward"] - linear - attention)
    model.fuse_layers = True
    return ms


def over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def batch1_tables(runs: dict[str, list[Run]], prompts: list[Prompt]) -> str:
    tps = {s: [r.tok_per_s for r in rs] for s, rs in runs.items()}
    hf, fp32 = (fmean(tps[s]) if s in tps else None for s in ("hf", "fp32"))
    summary = md_table(
        ["system", "mean tok/s", "min", "max", "vs transformers", "vs specserve float32"],
        [[SYSTEMS[s], f"{fmean(v):.1f}", f"{min(v):.1f}", f"{max(v):.1f}", times(over(fmean(v), hf)),
          times(over(fmean(v), fp32))] for s, v in tps.items()])
    per_prompt = md_table(
        ["question", "category", "prompt tokens", *(SYSTEMS[s] for s in runs)],
        [[str(p.question_id), p.category, str(len(p.ids)), *(f"{tps[s][i]:.1f}" for s in runs)]
         for i, p in enumerate(prompts)])
    return f"{summary}\n\nPer prompt, tok/s:\n\n{per_prompt}"


def throughput_table(aggregate: dict[str, dict[int, float]]) -> str:
    rows = [[SYSTEMS[s], str(n), f"{v:.1f}", times(v / by_n[1])]
            for s, by_n in aggregate.items() for n, v in by_n.items()]
    return md_table(["system", "concurrent sequences", "aggregate tok/s", "vs batch-1 aggregate"], rows)


def quality_table(runs: dict[str, list[Run]], ppl: dict[str, float]) -> str:
    rows = [[SYSTEMS["fp32"], "(reference)", "", f"{ppl['fp32']:.3f}", ""]]
    for s in (s for s in runs if s != "fp32"):
        prefixes = [common_prefix_len(a.token_ids, b.token_ids) for a, b in zip(runs["fp32"], runs[s])]
        identical = sum(p == len(r.token_ids) for p, r in zip(prefixes, runs[s]))
        ppl_cells = [f"{ppl[s]:.3f}", f"{100 * (ppl[s] / ppl['fp32'] - 1):+.2f}%"] if s in ppl else ["-", "-"]
        rows.append([SYSTEMS[s], f"{identical}/{len(prefixes)}", f"{fmean(prefixes):.1f}", *ppl_cells])
    return md_table(["system", "identical outputs", "mean common prefix (tokens)", "perplexity", "vs float32"], rows)


def kv_table(runs: dict[str, list[Run]], aggregate: dict[str, dict[int, float]], ppl: dict[str, float],
             kv_runs: dict[tuple[str, str], KvRun]) -> str:
    """Each specserve system with a float32 cache (from the runs above) and with the other KV dtypes."""
    rows = []
    for system in (s for s in DTYPES if s in runs):
        base = fmean([r.tok_per_s for r in runs[system]])
        base_wave = aggregate.get(system, {}).get(KV_CONCURRENCY)
        rows.append([SYSTEMS[system], "float32", f"{base:.1f}", "-" if base_wave is None else f"{base_wave:.1f}",
                     "(reference)", "", f"{ppl[system]:.3f}", ""])
        for (s, kv_dtype), kv in kv_runs.items():
            if s != system:
                continue
            prefixes = [common_prefix_len(a.token_ids, b.token_ids) for a, b in zip(runs[system], kv.runs)]
            identical = sum(p == len(r.token_ids) for p, r in zip(prefixes, kv.runs))
            batch1 = fmean([r.tok_per_s for r in kv.runs])
            wave = f"{kv.aggregate:.1f} ({times(over(kv.aggregate, base_wave))})"
            rows.append([SYSTEMS[system], kv_dtype, f"{batch1:.1f} ({times(batch1 / base)})", wave,
                         f"{identical}/{len(prefixes)}", f"{fmean(prefixes):.1f}", f"{kv.ppl:.3f}",
                         f"{100 * (kv.ppl / ppl[system] - 1):+.2f}%"])
    headers = ["system", "KV cache", "batch-1 mean tok/s", f"{KV_CONCURRENCY} concurrent tok/s",
               "identical outputs", "mean common prefix (tokens)", "perplexity", "vs float32 cache"]
    return md_table(headers, rows)


def profile_table(profiles: dict[str, dict[str, float]]) -> str:
    keys = ["step", "forward", "bookkeeping", "layered_forward", "linear", "attention", "other"]
    headers = ["system", "step ms", "model forward ms", "Python/bookkeeping ms", "per-layer forward ms",
               "linear ms", "attention ms", "other ops ms"]
    return md_table(headers, [[SYSTEMS[s], *(f"{p[k]:.2f}" for k in keys)] for s, p in profiles.items()])


def targets_text(runs: dict[str, list[Run]], aggregate: dict[str, dict[int, float]]) -> str:
    means = {s: fmean([r.tok_per_s for r in rs]) for s, rs in runs.items()}
    checks = [
        ("specserve float32 >= 1.3x transformers at batch 1", over(means.get("fp32"), means.get("hf")), 1.3),
        ("specserve int8 >= 2x specserve float32 at batch 1", over(means.get("int8"), means.get("fp32")), 2.0),
    ] + [
        (f"8 concurrent >= 4x the batch-1 aggregate, {DTYPES[s]}", over(by_n.get(8), by_n.get(1)), 4.0)
        for s, by_n in aggregate.items()
    ]
    lines = [f"- {name}: " + ("not measured in this run" if value is None else
                              f"{value:.2f}x, {'met' if value >= goal else 'NOT met'}") for name, value, goal in checks]
    return "Targets of the issue, checked against the numbers above:\n\n" + "\n".join(lines)


def command_line() -> str:
    python = Path(sys.executable)
    shown = python.relative_to(REPO_ROOT) if python.is_relative_to(REPO_ROOT) else python
    return shlex.join([str(shown), "bench/bench_engine.py", *sys.argv[1:]])


def doc_section(bench: Bench, load_average: float, tables: str) -> str:
    args, prompts = bench.args, bench.prompts
    by_category: dict[str, list[int]] = defaultdict(list)
    for p in sorted(prompts, key=lambda p: p.question_id):
        by_category[p.category].append(p.question_id)
    ids = "; ".join(f"{category} {', '.join(map(str, qids))}" for category, qids in sorted(by_category.items()))
    return f"""## Engine: batch-1 speed, throughput, quantization (`bench/bench_engine.py`)

- Command: `{command_line()}`, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.
- Machine: {machine_text()}. One-minute load average at start: {load_average:.2f}.
- Model: SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 at load. specserve runs it with
  float32, bfloat16 (bf16 weights, fp32 activations) or int8 weights (W8A8: per-channel int8 weights,
  per-token int8 activations); transformers loads the same GGUF in float32; llama.cpp, when installed,
  runs the Q4_1 file as it is. specserve's attention backend: {resolve_attention_backend("auto")} (the default
  "auto"; "cpu" is the C++ kernels of kernels/csrc/: tree_attention_cpu.cpp for decode rows,
  prefill_attention_cpu.cpp for prefill chunks over 16 tokens, or SDPA where that one does not apply).
- Prompts: {len(prompts)} Spec-Bench first-turn questions, evenly spaced over the file sorted by (category,
  id); specserve's tokenizer applies the chat template and every system gets the same token ids.
  Question ids: {ids}.
- Method: greedy, exactly {args.max_tokens} new tokens per prompt: every system ignores EOS. tok/s = new
  tokens / wall time of the whole generation, prefill included. One warm-up generation per system, on
  the longest prompt, before timing. Each specserve run gets a fresh engine (and llama.cpp a reset
  context), so no prefix cache carries over between runs.
- Throughput: the first {max(args.concurrency)} prompts (cycled when fewer) in waves of N concurrent
  sequences, one `generate` call and a fresh engine per wave; concurrency 1 is the batch-1 aggregate of
  the same prompts (their batch-1 runs above: total new tokens / summed wall time).
- Quality: greedy outputs compared with specserve float32's; perplexity of {PPL_TOKENS} tokens of GSM8K-train
  question/answer text, scored in independent {PPL_CHUNK}-token chunks.
- KV cache precision: every run above uses a float32 KV cache; the last table reruns each specserve system's
  batch-1 prompts, its waves of {KV_CONCURRENCY} and the perplexity with each other cache dtype
  ({", ".join(args.kv_dtypes)} asked), and compares its greedy outputs with the same weights' over a float32
  cache.
- Step profile: prompt {prompts[0].question_id}, {PROFILE_WARMUP_STEPS} warm-up decode steps, then the mean of
  {PROFILE_STEPS}, as the engine runs them (the decoder layers in one fused C++ call,
  kernels/csrc/decoder_cpu.cpp); model forward from a hook on the model; bookkeeping: `step()` minus the
  forward (schedule, tensors, attention metadata, sampling, detokenization). Then as many steps through the
  per-layer modules (`fuse_layers = False`), split by hooks on them: linear,
  every projection and the LM head (int8: with the activation quantization); attention, RoPE, KV write
  and the attention kernel; other, norms, SiLU, embedding, residual adds. Hooks add their own cost.

{tables}"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20, help="Spec-Bench questions (default 20)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}; "
                        "llamacpp is skipped when llama-cpp-python is not installed")
    parser.add_argument("--concurrency", default="1,4,8,16", help="concurrent sequences (1 is always added)")
    parser.add_argument("--kv-dtypes", default=",".join(KV_DTYPES),
                        help="KV cache dtypes to compare, each with every specserve system (float32 is the runs above)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_tokens = 2, 16
    args.systems = [s for s in args.systems.split(",") if s]
    if set(args.systems) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(set(args.systems) - set(SYSTEMS)))}")
    if "llamacpp" in args.systems and importlib.util.find_spec("llama_cpp") is None:
        log("llama-cpp-python is not installed: skipping llama.cpp")
        args.systems.remove("llamacpp")
    args.concurrency = sorted({1, *(int(n) for n in args.concurrency.split(","))})
    args.kv_dtypes = [k for k in args.kv_dtypes.split(",") if k]
    if set(args.kv_dtypes) - set(KV_DTYPES):
        parser.error(f"unknown KV dtypes: {', '.join(sorted(set(args.kv_dtypes) - set(KV_DTYPES)))}")
    return args


def load_bench(args: argparse.Namespace) -> Bench:
    model_path = ensure_default_model(specserve_home(os.environ))
    tokenizer = load_tokenizer(str(model_path))

    def chat_ids(question: str) -> list[int]:
        return tokenizer.render_prompt_ids([{"role": "user", "content": question}])

    prompts = [Prompt(q["question_id"], q["category"], chat_ids(q["turns"][0])) for q in select_questions(args.prompts)]
    log("loading models")
    models = {s: build_model(str(model_path), DTYPES[s]) for s in args.systems if s in DTYPES}
    return Bench(args, model_path, tokenizer, models, prompts, chat_ids(WARMUP_QUESTION))


def main() -> None:
    args = parse_args()
    load_average = os.getloadavg()[0]
    bench = load_bench(args)
    runs = run_batch1(bench)
    aggregate = run_throughput(bench, runs)
    log("perplexity and decode-step profile")
    ppl_ids = perplexity_text_ids(bench.tokenizer)
    ppl = {s: perplexity(m, ppl_ids) for s, m in bench.models.items()}
    profiles = {s: profile_decode(bench, s) for s in DTYPES if s in bench.models}
    kv_runs = run_kv_dtypes(bench)

    title = f"### Batch 1: tok/s, {args.max_tokens} new tokens, prefill included"
    tables = [f"{title}\n\n{batch1_tables(runs, bench.prompts)}"]
    if aggregate:
        tables.append(f"### Throughput: concurrent sequences in one engine\n\n{throughput_table(aggregate)}")
    if "fp32" in runs and len(runs) > 1:
        tables.append(f"### Agreement with specserve float32, and perplexity\n\n{quality_table(runs, ppl)}")
    if profiles:
        tables.append(f"### One batch-1 decode step (mean of {PROFILE_STEPS})\n\n{profile_table(profiles)}")
    if kv_runs:
        tables.append(f"### KV cache precision\n\n{kv_table(runs, aggregate, ppl, kv_runs)}")
    tables.append(targets_text(runs, aggregate))
    print("\n\n".join(tables), flush=True)
    if not args.no_write:
        write_doc(DOC_PATH, doc_section(bench, load_average, "\n\n".join(tables)), DOC_START, DOC_END)
        print(f"\nwrote {DOC_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
