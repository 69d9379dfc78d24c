"""Real specserve processes on loopback for the end-to-end tests: start a command, read the service address
lines it prints, stop it (SIGTERM, then SIGKILL) after the test or the module; greedy references from the
engine in this process.

Children inherit this environment (OMP_NUM_THREADS included) and run from a scratch folder, so the repo's
`services/` is never importable as a top-level module.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 300.0  # five processes loading the model on two slow, shared cores
STOP_TIMEOUT_S = 60.0


@dataclass
class Running:
    """A started command: `addresses` maps each service name it printed (router, verifier-0, ...) to HOST:PORT,
    `lines` to its whole line."""

    process: subprocess.Popen
    stderr_path: Path
    addresses: dict[str, str] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Launcher:
    """launch(args, last): run `python -m specserve.cli ARGS` and wait until it has printed the line of service
    `last`; a command that exits or stays silent fails the test with its stderr. `stop_all`: newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Running] = []

    def __call__(self, args: list[str], last: str, timeout: float = START_TIMEOUT_S) -> Running:
        stderr_path = self.workdir / f"stderr-{time.monotonic_ns()}-{args[0]}.txt"
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "specserve.cli", *args], cwd=self.workdir,
                                       env=os.environ.copy(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=stderr, text=True)
        running = Running(process, stderr_path)
        self.started.append(running)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_read_lines, args=(process, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while last not in running.addresses:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                running.stop()
                pytest.fail(f"`specserve {' '.join(args)}` printed no {last} line (exit {process.returncode}):\n"
                            f"{running.stderr()[-3000:]}")
            name, fields = line.split(" ", 1)
            running.lines[name] = line
            running.addresses[name] = fields.split()[0].removeprefix("grpc=")
        return running

    def stop_all(self) -> None:
        for running in reversed(self.started):
            running.stop()


def _read_lines(process: subprocess.Popen, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put(line.strip())
    lines.put(None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def module_launch(workdir) -> Iterator[Launcher]:
    """Processes shared by a module's tests, stopped after its last test."""
    launcher = Launcher(workdir)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def launch(workdir) -> Iterator[Launcher]:
    """Processes of one test, stopped after it."""
    launcher = Launcher(workdir)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def greedy_reference(llama_model, tokenizer) -> Callable[[list[str], int], list[list[int]]]:
    """reference(prompts, max_tokens): each chat prompt's greedy token ids from the engine in this process
    (plain decoding, no speculation); cached."""
    from specserve.engine.config import CacheConfig, EngineConfig, SamplingParams
    from specserve.engine.llm_engine import LLMEngine

    cache: dict[tuple[str, int], list[int]] = {}

    def reference(prompts: list[str], max_tokens: int) -> list[list[int]]:
        missing = [p for p in dict.fromkeys(prompts) if (p, max_tokens) not in cache]
        if missing:
            config = EngineConfig(model_path="unused", cache=CacheConfig(num_blocks=1024))
            engine = LLMEngine(config, llama_model, tokenizer)
            ids = [engine.encode_prompt(p) for p in missing]
            for prompt, completion in zip(missing, engine.generate(ids, SamplingParams(max_tokens=max_tokens))):
                cache[prompt, max_tokens] = completion.token_ids
        return [cache[p, max_tokens] for p in prompts]

    return reference


@pytest.fixture(scope="module")
def short_prompts(spec_bench_prompts) -> list[str]:
    """16 Spec-Bench questions under 120 characters, spread over the file (and so over its categories)."""
    short = [p for p in spec_bench_prompts if len(p) < 120]
    return short[:: len(short) // 16][:16]
