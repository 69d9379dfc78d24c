"""`specserve bench lossy`: relaxed (lossy) acceptance against lossless on GSM8K test problems.

Lossless greedy speculation, the default LossyConfig and a few other settings each answer the same
problems through one engine with several requests in flight; per setting: accuracy, tok/s, tau (tokens
per target forward), how many outputs differ from lossless, and how many final answers (the last number)
stay those of lossless and which correct answers are lost or gained: at this model's few percent of
GSM8K accuracy, answer agreement says more about a setting's fidelity than the accuracy difference.
Lossless is exactly plain greedy decoding.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from specserve.bench.common import (
    GSM8K_FILE, GSM8K_TRAIN_FILE, chat_ids, log, md_table, provenance_text, publish, read_jsonl, require_checkpoint,
    require_datastore, require_files, require_run_values, spec_config,
)
from specserve.engine.acceptance import LossyConfig
from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, SpecConfig
from specserve.engine.llm_engine import LLMEngine, build_model, load_tokenizer
from specserve.engine.model import LlamaModel
from specserve.engine.tokenizer import Tokenizer
from specserve.errors import InvalidRequestError

# The study runs on the GSM8K test problems; `--split train` runs it on GSM8K train problems instead, where
# settings can be compared and a default chosen without looking at the test problems.
SPLIT_FILES = {"test": GSM8K_FILE, "train": GSM8K_TRAIN_FILE}
DOC_MARKERS = {split: (f"<!-- bench_lossy{suffix}:start -->", f"<!-- bench_lossy{suffix}:end -->")
               for split, suffix in (("test", ""), ("train", "_train"))}
ANSWER_MARK = "####"  # a GSM8K answer ends with "#### <number>"
# Run besides lossless and LossyConfig() (always run): strict to loose (top_k, min_ratio, budget nats).
EXTRA_SETTINGS = (LossyConfig(2, 0.5, 2.0), LossyConfig(2, 0.5, 16.0), LossyConfig(0, 0.2, 64.0))
# The criterion for the default setting.
MAX_ACCURACY_DROP = 1.0  # percentage points below lossless
MIN_TAU_RATIO = 1.3  # tau / lossless tau
MIN_PROBLEMS = 200
BLOCK_SIZE = 16
# A number as written in an answer: "1,234.5", "18", "-3". The lookbehind keeps "16-3" from reading as -3
# and "x2" from reading as 2; commas only count as thousands separators.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class LossyBenchConfig:
    """One `specserve bench lossy` run, built by the CLI."""

    model_path: Path
    data_dir: Path  # holds GSM8K_FILE
    datastore: Path  # read when the drafter is a retrieval one (rest, auto)
    draft_checkpoints: Mapping[str, Path] = field(default_factory=dict)  # kind -> path, for the learned kinds
    settings: tuple[LossyConfig, ...] = EXTRA_SETTINGS  # run after lossless and LossyConfig()
    problems: int = 200  # the first N of the split's file
    split: str = "test"  # a key of SPLIT_FILES
    max_tokens: int = 256
    dtype: str = "float32"
    drafter: str = "ngram"
    num_draft_tokens: int = SpecConfig.num_draft_tokens
    concurrency: int = 8  # requests in flight in each setting's engine
    doc: Path | None = None  # results doc to rewrite; None prints only
    command: str = "specserve bench lossy"  # as run, for the doc

    def __post_init__(self) -> None:
        require_run_values((self.drafter,), self.dtype, problems=self.problems, max_tokens=self.max_tokens,
                           num_draft_tokens=self.num_draft_tokens, concurrency=self.concurrency)
        if self.split not in SPLIT_FILES:
            raise InvalidRequestError(f"GSM8K split must be one of {', '.join(SPLIT_FILES)}, got {self.split!r}")
        require_files(self.data_dir, (SPLIT_FILES[self.split],))
        require_datastore((self.drafter,), self.datastore)
        require_checkpoint((self.drafter,), self.draft_checkpoints)


@dataclass(frozen=True)
class Problem:
    question: str
    gold: float  # the number after ANSWER_MARK


@dataclass
class SettingRun:
    """One setting's pass over every problem."""

    lossy: LossyConfig | None  # None: lossless
    outputs: list[list[int]]  # [num_problems] generated token ids
    correct: list[bool]  # [num_problems]
    seconds: float  # wall time of the one `generate` call that ran them all
    forwards: int  # target forwards, summed over the problems
    answers: list[float | None] = field(default_factory=list)  # [num_problems] last number of each answer

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.outputs)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tau(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def accuracy(self) -> float:
        """Percent of problems answered correctly."""
        return 100 * sum(self.correct) / len(self.correct)


def parse_settings(text: str) -> tuple[LossyConfig, ...]:
    """Comma-separated `top_k:min_ratio:budget` triples ("2:0.8:1,3:0.3:4") -> LossyConfigs."""
    settings = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            top_k, min_ratio, budget = int(parts[0]), float(parts[1]), float(parts[2])
        except ValueError:
            raise InvalidRequestError(f"lossy setting {item!r} is not top_k:min_ratio:budget (e.g. 2:0.5:2)") from None
        settings.append(LossyConfig(top_k, min_ratio, budget))
    return tuple(settings)


def last_number(text: str) -> float | None:
    """The last number in `text`, dollar signs and thousands commas dropped; None when there is none."""
    matches = _NUMBER.findall(text.replace("$", ""))
    return float(matches[-1].replace(",", "")) if matches else None


def is_correct(answer_text: str, gold: float) -> bool:
    """GSM8K scoring: the last number of the model's answer equals the gold answer."""
    return same_answer(last_number(answer_text), gold)


def same_answer(a: float | None, b: float | None) -> bool:
    """Two final answers (last numbers) agree: equal, or both missing."""
    return a is None and b is None or a is not None and b is not None and math.isclose(a, b, rel_tol=0.0, abs_tol=1e-6)


def load_problems(data_dir: Path, n: int, split: str = "test") -> list[Problem]:
    problems = []
    for row, _ in zip(read_jsonl(data_dir / SPLIT_FILES[split]), range(n)):
        gold = last_number(row["answer"].split(ANSWER_MARK)[-1])
        assert ANSWER_MARK in row["answer"] and gold is not None, f"no '{ANSWER_MARK} <number>' in {row['answer']!r}"
        problems.append(Problem(row["question"], gold))
    return problems


def engine_for(config: LossyBenchConfig, model: LlamaModel, tokenizer: Tokenizer, lossy: LossyConfig | None,
               longest_prompt: int) -> LLMEngine:
    """At most `concurrency` requests in flight, with KV blocks for that many of the longest ones (no
    preemption), drafts included."""
    per_seq = -(-(longest_prompt + config.max_tokens + config.num_draft_tokens + 1) // BLOCK_SIZE)
    engine_config = EngineConfig(
        model_path=str(config.model_path),
        dtype=config.dtype,
        cache=CacheConfig(BLOCK_SIZE, config.concurrency * per_seq + 1),
        scheduler=SchedulerConfig(max_num_seqs=config.concurrency),
        spec=spec_config(config.drafter, config.num_draft_tokens, config.datastore, lossy, config.draft_checkpoints),
    )
    return LLMEngine(engine_config, model, tokenizer)


def run_setting(config: LossyBenchConfig, model: LlamaModel, tokenizer: Tokenizer, lossy: LossyConfig | None,
                prompts: list[list[int]], problems: list[Problem]) -> SettingRun:
    engine = engine_for(config, model, tokenizer, lossy, max(map(len, prompts)))
    start = time.perf_counter()
    completions = engine.generate(prompts, SamplingParams(max_tokens=config.max_tokens))
    seconds = time.perf_counter() - start
    answers = [last_number(c.text) for c in completions]
    correct = [same_answer(a, p.gold) for a, p in zip(answers, problems)]
    forwards = sum(c.spec.forwards for c in completions)
    return SettingRun(lossy, [c.token_ids for c in completions], correct, seconds, forwards, answers)


def setting_label(lossy: LossyConfig | None) -> str:
    if lossy is None:
        return "lossless"
    return "lossy (default)" if lossy == LossyConfig() else "lossy"


def table(runs: list[SettingRun]) -> str:
    lossless = runs[0]
    headers = ["setting", "top_k", "min_ratio", "budget (nats)", "accuracy", "tok/s", "tok/s vs lossless", "tau",
               "tau vs lossless", "outputs differing from lossless", "final answer as lossless",
               "correct answers lost / gained"]
    rows = []
    for run in runs:
        lossy = run.lossy
        knobs = ["", "", ""] if lossy is None else [str(lossy.top_k), f"{lossy.min_ratio:g}", f"{lossy.budget:g}"]
        differing = sum(a != b for a, b in zip(run.outputs, lossless.outputs))
        same = sum(same_answer(a, b) for a, b in zip(run.answers, lossless.answers))
        lost = sum(was and not now for was, now in zip(lossless.correct, run.correct))
        gained = sum(now and not was for was, now in zip(lossless.correct, run.correct))
        rows.append([
            setting_label(run.lossy), *knobs, f"{run.accuracy:.1f}% ({sum(run.correct)}/{len(run.correct)})",
            f"{run.tok_per_s:.1f}", f"{run.tok_per_s / lossless.tok_per_s:.2f}x", f"{run.tau:.2f}",
            f"{run.tau / lossless.tau:.2f}x", f"{differing}/{len(run.outputs)}",
            f"{same}/{len(run.outputs)}" if run.answers else "-", f"{lost} / {gained}",
        ])
    return md_table(headers, rows)


def criterion_text(runs: list[SettingRun]) -> str:
    """The issue's criterion for the default lossy setting, checked against the table."""
    lossless = runs[0]
    default = next((r for r in runs if r.lossy == LossyConfig()), None)
    line = (f"- default lossy setting within {MAX_ACCURACY_DROP:g} point of lossless accuracy with tau >= "
            f"{MIN_TAU_RATIO}x lossless, on >= {MIN_PROBLEMS} problems: ")
    if default is None:
        line += "not measured in this run"
    else:
        change, tau_ratio, n = default.accuracy - lossless.accuracy, default.tau / lossless.tau, len(lossless.correct)
        met = change >= -MAX_ACCURACY_DROP - 1e-9 and tau_ratio >= MIN_TAU_RATIO and n >= MIN_PROBLEMS
        line += (f"accuracy {default.accuracy:.1f}% vs {lossless.accuracy:.1f}% ({change:+.1f} points), "
                 f"tau {tau_ratio:.2f}x, {n} problems, {'met' if met else 'NOT met'}")
    return "Criterion of the issue, checked against the numbers above:\n\n" + line


def run_bench(config: LossyBenchConfig) -> None:
    load_average = os.getloadavg()[0]
    tokenizer = load_tokenizer(str(config.model_path))
    problems = load_problems(config.data_dir, config.problems, config.split)
    prompts = [chat_ids(tokenizer, p.question) for p in problems]
    model = build_model(str(config.model_path), config.dtype)
    engine_for(config, model, tokenizer, None, len(prompts[0])).generate(prompts[:1], SamplingParams(max_tokens=8))
    runs = []
    # Lossless first (the reference), then the default setting, then the others; each once.
    for lossy in [None, *dict.fromkeys([LossyConfig(), *config.settings])]:
        log(f"{lossy or 'lossless'}: {len(problems)} problems")
        runs.append(run_setting(config, model, tokenizer, lossy, prompts, problems))
        log(f"accuracy {runs[-1].accuracy:.1f}%, {runs[-1].tok_per_s:.1f} tok/s, tau {runs[-1].tau:.2f}")
    result = f"{table(runs)}\n\n{criterion_text(runs)}"
    publish(result, doc_section(config, load_average, len(problems), result), config.doc, DOC_MARKERS[config.split])


def doc_section(config: LossyBenchConfig, load_average: float, num_problems: int, result: str) -> str:
    title = "" if config.split == "test" else ", train split (for choosing settings)"
    return f"""## Lossy acceptance against lossless on GSM8K{title} (`{config.command}`)

{provenance_text(config.command, load_average)}
- Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), weights {config.dtype}.
- Prompts: the first {num_problems} GSM8K {config.split} problems (`{SPLIT_FILES[config.split]}`), each
  question alone as the user message, chat template applied (no few-shot examples).
- Method: greedy, up to {config.max_tokens} new tokens, stopping at EOS; drafter {config.drafter}, up to
  {config.num_draft_tokens} drafted tokens verified a step (the engine shares its per-step draft budget
  out over the sequences in flight). Each setting runs every problem through one engine, {config.concurrency}
  requests in flight, after one warm-up generation. tok/s = all new tokens / wall time of that run;
  tau = new tokens / target forwards, summed over the problems. Lossy settings relax acceptance as
  `LossyConfig` (engine/acceptance.py) describes: top_k and min_ratio limit which drafted tokens may be
  kept, budget caps the nats of log-likelihood a request may give up; lossless is plain greedy output.
- Accuracy: the last number in the answer text (dollar signs and thousands commas dropped) equals the
  number after `{ANSWER_MARK}` in the reference answer.

{result}"""
