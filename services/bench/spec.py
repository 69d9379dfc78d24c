"""`specserve bench spec`: speculative decoding on CPU per Spec-Bench category (plus HumanEval and a GSM8K
slice): tok/s and tau of each drafter against specserve plain decoding, transformers `generate`, and
transformers' own prompt-lookup assisted generation on the same prompts. Greedy, batch 1.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specserve.bench.common import (
    GSM8K_FILE, HUMANEVAL_FILE, LEARNED_DRAFTERS, SPEC_BENCH_FILE, chat_ids, log, md_table, provenance_text, publish,
    read_jsonl, require_checkpoint, require_datastore, require_files, require_run_values, spec_config,
)
from specserve.drafters import build_drafter
from specserve.drafters.sampling import GuessingDrafter
from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams, SpecConfig
from specserve.engine.llm_engine import LLMEngine, build_model, load_tokenizer
from specserve.engine.tokenizer import Tokenizer
from specserve.errors import InvalidRequestError

DOC_MARKERS = ("<!-- bench_spec:start -->", "<!-- bench_spec:end -->")
# A sampled run (temperature > 0) has its own section, so it never replaces the greedy table.
SAMPLED_DOC_MARKERS = ("<!-- bench_spec_sampled:start -->", "<!-- bench_spec_sampled:end -->")
SAMPLING_SEED = 0  # every sampled request's seed: reruns draw the same tokens
BLOCK_SIZE = 16
HF_SYSTEMS = {"hf": "transformers", "hf-pld": "transformers prompt lookup"}
PLAIN = "specserve plain"
GUESS = ":guess"  # `--drafters eagle:guess`: the learned drafter guessing at T > 0 instead of sampling
SPEC_BENCH_MIX = "Spec-Bench mix"
EXTRA_SETS = ("humaneval", "gsm8k")  # not Spec-Bench categories: reported, but left out of the mix


@dataclass(frozen=True)
class SpecBenchConfig:
    """One `specserve bench spec` run, built by the CLI."""

    model_path: Path
    data_dir: Path  # holds SPEC_BENCH_FILE, HUMANEVAL_FILE and GSM8K_FILE
    datastore: Path  # read by the retrieval drafters (rest, auto)
    draft_checkpoints: Mapping[str, Path] = field(default_factory=dict)  # kind -> path, for the learned kinds
    drafters: tuple[str, ...] = ("ngram", "rest", "auto")
    per_category: int = 5  # prompts of each Spec-Bench category, and of HumanEval and GSM8K
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy; above: sampled with a fixed seed, transformers not run
    dtype: str = "float32"  # specserve weights; transformers always runs float32
    num_draft_tokens: int = SpecConfig.num_draft_tokens
    hf: bool = True  # the transformers baselines (skipped with a notice when transformers is missing)
    doc: Path | None = None  # results doc to rewrite; None prints only
    command: str = "specserve bench spec"  # as run, for the doc

    def __post_init__(self) -> None:
        methods = [d.removesuffix(GUESS) for d in self.drafters]
        require_run_values(methods, self.dtype, per_category=self.per_category, max_tokens=self.max_tokens,
                           num_draft_tokens=self.num_draft_tokens)
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"--temperature must be >= 0, got {self.temperature}")
        for drafter in self.drafters:
            guessing = drafter.removesuffix(GUESS)
            if drafter != guessing and (guessing not in LEARNED_DRAFTERS or not self.temperature):
                raise InvalidRequestError(f"{drafter}: the {GUESS} variant is for learned drafters (which sample their "
                                          "drafts at --temperature > 0), compared at --temperature > 0")
        require_files(self.data_dir, (SPEC_BENCH_FILE, HUMANEVAL_FILE, GSM8K_FILE))
        require_datastore(methods, self.datastore)
        require_checkpoint(methods, self.draft_checkpoints)


@dataclass
class Prompt:
    category: str
    ids: list[int]


@dataclass
class Run:
    tokens: int
    seconds: float
    forwards: int  # target forwards (tau = tokens / forwards); 0 when the system does not say


def load_prompts(data_dir: Path, per_category: int, tokenizer: Tokenizer) -> list[Prompt]:
    """`per_category` first-turn questions of every Spec-Bench category, then HumanEval and GSM8K (test)."""
    by_category: dict[str, list[str]] = defaultdict(list)
    for q in read_jsonl(data_dir / SPEC_BENCH_FILE):
        by_category[q["category"]].append(q["turns"][0])
    texts = [(c, t) for c, questions in sorted(by_category.items()) for t in questions[:per_category]]
    tasks = [row["prompt"] for row, _ in zip(read_jsonl(data_dir / HUMANEVAL_FILE), range(per_category))]
    texts += [("humaneval", f"Complete this Python function.\n\n{t}") for t in tasks]
    texts += [("gsm8k", row["question"]) for row, _ in zip(read_jsonl(data_dir / GSM8K_FILE), range(per_category))]
    return [Prompt(category, chat_ids(tokenizer, text)) for category, text in texts]


def specserve_runner(model, tokenizer: Tokenizer, model_path: Path, spec: SpecConfig, max_tokens: int,
                     temperature: float = 0.0, guess: bool = False) -> Callable:
    """`guess`: the drafter guesses even for sampling requests (drafters/sampling.py, GuessingDrafter)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                            seed=SAMPLING_SEED if temperature > 0 else None)

    def run(ids: list[int]) -> Run:
        num_blocks = -(-(len(ids) + max_tokens + spec.num_draft_tokens + 1) // BLOCK_SIZE) + 1
        config = EngineConfig(model_path=str(model_path), spec=spec, cache=CacheConfig(BLOCK_SIZE, num_blocks))
        drafter = GuessingDrafter(build_drafter(spec, model, tokenizer)) if guess else None
        engine = LLMEngine(config, model, tokenizer, drafter)
        start = time.perf_counter()
        completion = engine.generate([ids], params)[0]
        seconds = time.perf_counter() - start
        return Run(len(completion.token_ids), seconds, completion.spec.forwards)

    return run


def hf_runner(model_path: Path, max_tokens: int, prompt_lookup: bool, eos_ids: tuple[int, ...]) -> Callable:
    from transformers import AutoModelForCausalLM  # a benchmark reference only (the bench extra)

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


def time_system(name: str, run: Callable, prompts: list[Prompt]) -> list[Run]:
    log(f"{name}: {len(prompts)} prompts")
    run(prompts[0].ids)  # warm-up
    return [run(p.ids) for p in prompts]


def rates(systems: dict[str, list[Run]], prompts: list[Prompt]) -> dict[str, dict[str, tuple[float, float]]]:
    """row label -> system -> (tok/s, tau); tau is 0 for systems that do not report forwards."""
    categories = sorted({p.category for p in prompts}, key=lambda c: (c in EXTRA_SETS, c))
    by_row: dict[str, dict[str, tuple[float, float]]] = {}
    for label in [*categories, SPEC_BENCH_MIX]:
        idx = [i for i, p in enumerate(prompts)
               if (p.category not in EXTRA_SETS if label == SPEC_BENCH_MIX else p.category == label)]
        by_row[label] = {}
        for name, runs in systems.items():
            tokens, forwards = sum(runs[i].tokens for i in idx), sum(runs[i].forwards for i in idx)
            by_row[label][name] = (tokens / sum(runs[i].seconds for i in idx), tokens / forwards if forwards else 0.0)
    return by_row


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


def run_bench(config: SpecBenchConfig) -> None:
    load_average = os.getloadavg()[0]
    hf = config.hf and importlib.util.find_spec("transformers") is not None and config.temperature == 0
    if config.hf and config.temperature > 0:
        log("sampled run: the transformers baselines (greedy only here) are skipped")
    elif config.hf and not hf:
        log("transformers is not installed (the bench extra): skipping the transformers columns")
    tokenizer = load_tokenizer(str(config.model_path))
    prompts = load_prompts(config.data_dir, config.per_category, tokenizer)
    model = build_model(str(config.model_path), config.dtype)
    runners = {}
    for drafter in ("off", *config.drafters):
        method = drafter.removesuffix(GUESS)
        spec = spec_config(method, config.num_draft_tokens, config.datastore, checkpoints=config.draft_checkpoints)
        name = PLAIN if drafter == "off" else f"specserve {drafter}"
        runners[name] = specserve_runner(model, tokenizer, config.model_path, spec, config.max_tokens,
                                         config.temperature, guess=drafter != method)
    if hf:
        for key, label in HF_SYSTEMS.items():
            runners[label] = hf_runner(config.model_path, config.max_tokens, key == "hf-pld", tokenizer.eos_token_ids)
    systems = {name: time_system(name, runner, prompts) for name, runner in runners.items()}
    by_row = rates(systems, prompts)
    result = f"{table(by_row)}\n\n{targets_text(by_row)}".rstrip()
    markers = DOC_MARKERS if config.temperature == 0 else SAMPLED_DOC_MARKERS
    publish(result, doc_section(config, hf, load_average, len(prompts), result), config.doc, markers)


def doc_section(config: SpecBenchConfig, hf: bool, load_average: float, num_prompts: int, result: str) -> str:
    n = config.per_category
    baselines = ("; transformers float32. transformers prompt lookup: `generate(prompt_lookup_num_tokens=10)`"
                 if hf else "; transformers not run")
    if config.temperature == 0:
        title, decoding = "", ("greedy, batch 1, up to {} new tokens, stopping at EOS (the same for every system:\n"
                               "  speculation is lossless, so outputs match plain decoding)")
    else:
        title = f", sampled at temperature {config.temperature:g}"
        decoding = (f"sampled at temperature {config.temperature:g} (seed {SAMPLING_SEED} per request), batch 1, "
                    "up to {} new\n  tokens, stopping at EOS (speculation keeps the target's distribution, not its "
                    "random stream: outputs\n  differ between systems)")
    sampled = ("" if config.temperature == 0 else "\n  learned drafters sample their drafts from their own "
               f"distribution (`NAME{GUESS}`: the same drafter\n  guessing, its drafts verified as point masses);")
    return f"""## Speculative decoding, batch 1{title} (`specserve bench spec`)

{provenance_text(config.command, load_average)}
- Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), specserve weights {config.dtype}{baselines}.
- Prompts: the first {n} first-turn questions of each Spec-Bench category, the first {n} HumanEval tasks
  and GSM8K test questions ({num_prompts} in all), chat template applied.
- Method: {decoding.format(config.max_tokens)}. tok/s = new tokens / wall time, prefill
  included; a fresh engine per prompt (no prefix cache carried over); one warm-up prompt per system.
  tau = tokens per target forward. Drafters verify up to {config.num_draft_tokens} drafted tokens a step;{sampled}
  rest and auto retrieve from a datastore of the training corpora (`../shared/data/train/*.jsonl`, no
  benchmark prompt), built with `specserve datastore build`.

{result}"""
