"""What the benchmarks share: where the data and the results doc live, reading prompt files, the machine
line, markdown tables, and rewriting one marked section of docs/benchmarks.md.

Torch-free at import (`machine_text` imports it when called), so the CLI can check flags before the
slow imports of a run.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from specserve.engine.config import LEARNED_METHODS, SPEC_METHODS, WEIGHT_DTYPES, SpecConfig
from specserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from specserve.engine.acceptance import LossyConfig
    from specserve.engine.tokenizer import Tokenizer

# Prompt files, relative to the data directory.
SPEC_BENCH_FILE = "spec_bench/question.jsonl"
HUMANEVAL_FILE = "humaneval/HumanEval.jsonl.gz"
GSM8K_FILE = "gsm8k/test_head1119.jsonl"
GSM8K_TRAIN_FILE = "train/gsm8k_train.jsonl"  # for choosing settings; never trained on here either
DOC_HEADER = "# Benchmarks\n\nMeasured results. Each section is written by the script it names; rerun it to update.\n"
DRAFTERS = tuple(m for m in SPEC_METHODS if m != "off")
RETRIEVAL_DRAFTERS = ("rest", "auto")  # the drafters that read a token datastore
LEARNED_DRAFTERS = LEARNED_METHODS  # the drafters that load a trained checkpoint of their kind


def checkout_root() -> Path | None:
    """The repository root when specserve runs from a source checkout (editable install), else None."""
    here = Path(__file__).resolve()
    root = here.parents[2]
    return root if here.parents[1].name == "services" and (root / "pyproject.toml").is_file() else None


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """`$SPECSERVE_DATA_DIR`, else `shared/data` beside the checkout (beside the working directory when
    specserve is not running from a checkout)."""
    if environ.get("SPECSERVE_DATA_DIR"):
        return Path(environ["SPECSERVE_DATA_DIR"])
    return (checkout_root() or Path.cwd()).parent / "shared" / "data"


def default_doc_path() -> Path | None:
    """The checkout's docs/benchmarks.md; None outside a checkout."""
    root = checkout_root()
    return root / "docs" / "benchmarks.md" if root else None


def require_files(data_dir: Path, names: Iterable[str]) -> None:
    """One-line error naming the first prompt file missing under `data_dir`."""
    for name in names:
        if not (data_dir / name).is_file():
            raise InvalidRequestError(f"no data file {data_dir / name}; pass --data-dir DIR or set SPECSERVE_DATA_DIR")


def require_run_values(drafters: Iterable[str], dtype: str, **positive: int) -> None:
    """One-line errors for an unknown drafter or weight dtype, or a count flag (`per_category=...`) <= 0."""
    for drafter in drafters:
        if drafter not in DRAFTERS:
            raise InvalidRequestError(f"unknown drafter {drafter!r}; expected one of {', '.join(DRAFTERS)}")
    if dtype not in WEIGHT_DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    for name, value in positive.items():
        if value <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def require_datastore(drafters: Iterable[str], datastore: Path) -> None:
    """Fail before any model loads when a retrieval drafter would find no datastore."""
    for drafter in drafters:
        if drafter in RETRIEVAL_DRAFTERS and not datastore.is_file():
            raise InvalidRequestError(
                f"no datastore at {datastore} for the {drafter} drafter; build it with "
                "`specserve datastore build ../shared/data/train/*.jsonl` or pass --datastore PATH"
            )


def require_checkpoint(drafters: Sequence[str], checkpoints: Mapping[str, Path]) -> None:
    """Fail before any measurement when a learned drafter has no checkpoint file to load (`checkpoints`:
    kind -> path)."""
    for drafter in drafters:
        path = checkpoints.get(drafter)
        if drafter in LEARNED_DRAFTERS and (path is None or not path.is_file()):
            flag = "--draft-checkpoint" if drafter == "eagle" else f"--{drafter}-checkpoint"
            raise InvalidRequestError(f"no {drafter} checkpoint at {path}; train one with "
                                      f"`specserve train-draft --kind {drafter}` or pass {flag} PATH")


def spec_config(method: str, num_draft_tokens: int, datastore: Path, lossy: LossyConfig | None = None,
                checkpoints: Mapping[str, Path] | None = None) -> SpecConfig:
    """A drafter's SpecConfig; only the retrieval drafters are given the datastore, the learned ones the
    checkpoint of their kind (`checkpoints`: kind -> path), and auto the best of those that exist (as
    `specserve generate --spec auto` does: learned/checkpoint.py, `best_checkpoint`)."""
    from specserve.learned.checkpoint import best_checkpoint

    path = str(datastore) if method in RETRIEVAL_DRAFTERS else None
    checkpoints = checkpoints or {}
    if method == "auto":
        checkpoint = best_checkpoint(checkpoints)
    else:
        checkpoint = str(checkpoints[method]) if method in LEARNED_DRAFTERS and method in checkpoints else None
    return SpecConfig(method=method, num_draft_tokens=num_draft_tokens, datastore_path=path, lossy=lossy,
                      draft_checkpoint=checkpoint)


def read_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a .jsonl or .jsonl.gz file, one per line."""
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        for line in f:
            yield json.loads(line)


def select_questions(n: int) -> list[dict]:
    """`n` Spec-Bench questions evenly spaced over the file sorted by (category, id), then interleaved
    by category so that any leading slice (the throughput workload) mixes short and long prompts."""
    questions = sorted(read_jsonl(default_data_dir(os.environ) / SPEC_BENCH_FILE),
                       key=lambda q: (q["category"], q["question_id"]))
    by_category: dict[str, list[dict]] = defaultdict(list)
    for i in range(n):
        q = questions[(2 * i + 1) * len(questions) // (2 * n)]
        by_category[q["category"]].append(q)
    return [q for round_ in itertools.zip_longest(*by_category.values()) for q in round_ if q is not None]


def chat_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as one user message with the model's chat template applied."""
    return tokenizer.render_prompt_ids([{"role": "user", "content": text}])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_text() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("amx_int8", "AMX"))
           if flag in flags]
    cpu = f"{fields.get('model name', 'unknown CPU')}, {os.cpu_count()} cores" + (f" ({', '.join(isa)})" if isa else "")
    references = {"transformers": "transformers", "llama_cpp": "llama-cpp-python"}  # module -> distribution
    versions = [f"{d} {importlib.metadata.version(d)}" for m, d in references.items() if importlib.util.find_spec(m)]
    return f"{cpu}; torch {torch.__version__} with {torch.get_num_threads()} threads; {', '.join(versions)}"


def provenance_text(command: str, load_average: float) -> str:
    """The Command and Machine lines a doc section starts with."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"- Command: `{command}`, {when}.\n"
            f"- Machine: {machine_text()}. One-minute load average at start: {load_average:.2f}.")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_doc(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text between the `start` and `end` markers of `path` (append if absent; create the file)."""
    text = path.read_text() if path.exists() else DOC_HEADER
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def publish(result: str, section: str, doc: Path | None, markers: tuple[str, str]) -> None:
    """Print `result`; write `section` (which contains it) between `markers` of `doc` unless doc is None."""
    print(result, flush=True)
    if doc is not None:
        write_doc(doc, section, *markers)
        print(f"\nwrote {doc}")
