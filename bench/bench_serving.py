"""Serving benchmark: the same Router API served embedded (`specserve serve --embedded`, one process) and
distributed (`specserve up`: router, drafter and verifier processes on loopback), driven by concurrent
streaming gRPC clients, with speculation per request on (the server's drafter) and off.

Per system, load (concurrent clients) and speculation mode: aggregate tok/s, p50/p99 time to first token
and inter-token latency. Then the issue's targets: distributed batch-1 tok/s >= 0.8x embedded; 16
clients >= 5x the batch-1 aggregate; speculation on never more than 5% below off at the same load.

Prints markdown and replaces its section of docs/benchmarks.md (unless --no-write).
Run: .venv/bin/python bench/bench_serving.py [--quick] [--no-write]   (see --help)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import quantiles

from specserve.bench.common import log, machine_text, md_table, select_questions, write_doc
from specserve.client import Client
from specserve.model_fetch import ensure_default_model, specserve_home

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
DOC_START, DOC_END = "<!-- bench_serving:start -->", "<!-- bench_serving:end -->"
SYSTEMS = {"embedded": ["serve", "--embedded"], "distributed": ["up"]}
MODES = ("off", "lossless")
READY_TIMEOUT_S = 600
WARMUP_TOKENS = 16


@dataclass
class LoadResult:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)  # per request
    itl: list[float] = field(default_factory=list)  # per token after the first (a chunk's gap shared by its tokens)
    forwards: int = 0  # target forwards over all requests (tau = tokens / forwards)

    def merge(self, other: LoadResult) -> None:
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.ttft += other.ttft
        self.itl += other.itl
        self.forwards += other.forwards

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return quantiles(values, n=100, method="inclusive")[q - 1]


class Server:
    """A `specserve` serving command as a subprocess; `address` is its router's."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.address = self._wait_for_router()

    def _wait_for_router(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            match = re.match(r"router grpc=(\S+)", line)
            if match:
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return match.group(1)
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"server did not start: {self.lines} {self.proc.stderr.read()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_load(address: str, prompts: list[str], clients: int, requests: int, mode: str, max_tokens: int) -> LoadResult:
    """`requests` prompts spread over `clients` threads, each streaming its requests one after another."""
    result = LoadResult()
    lock = threading.Lock()
    work = list(range(requests))

    def client_thread() -> None:
        with Client(address) as client:
            while True:
                with lock:
                    if not work:
                        return
                    i = work.pop(0)
                start = time.perf_counter()
                last, ttft, gaps, n, forwards = start, None, [], 0, 0
                for chunk in client.stream(prompts[i % len(prompts)], max_tokens=max_tokens, speculation=mode,
                                           ignore_eos=True):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if ttft is None:
                            ttft = now - start
                            gaps += [0.0] * (len(chunk.token_ids) - 1)
                        else:
                            gaps += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                        last = now
                        n += len(chunk.token_ids)
                    if chunk.spec:
                        forwards = chunk.spec.get("forwards", 0)
                with lock:
                    result.tokens += n
                    result.ttft.append(ttft or 0.0)
                    result.itl += gaps
                    result.forwards += forwards

    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


def measure(system: str, args: argparse.Namespace, prompts: list[str]) -> dict[tuple[int, str], LoadResult]:
    argv = [str(Path(sys.executable).parent / "specserve"), *SYSTEMS[system], "--spec", args.spec, "--port", "0",
            "--dtype", args.dtype, "--num-blocks", str(args.num_blocks), "--max-queue", "1024"]
    log(f"{system}: {shlex.join(argv)}")
    server = Server(argv)
    results = {}
    try:
        for line in server.lines:
            log(f"  {line}")
        # Warm-up at the highest load in both modes: the first forward of each new batch shape is slow
        # (oneDNN primitives, allocator growth), which would otherwise land in whichever load came first.
        # Every prompt a load will send goes through once, so no mode pays prefills the other finds in
        # the prefix cache (the modes run one after the other on the same server).
        most_requests = max(args.min_requests, args.requests_per_client * max(args.loads))
        warm = max(max(args.loads), min(len(prompts), most_requests))
        for mode in MODES:
            run_load(server.address, prompts, max(args.loads), warm, mode, WARMUP_TOKENS)
        for clients in args.loads:
            requests = max(args.min_requests, args.requests_per_client * clients)
            # The load's prompts again, just before it: the loads before it may have pushed some out of
            # the prefix cache, which would bill their prefills to whichever mode came first.
            run_load(server.address, prompts, clients, requests, MODES[0], WARMUP_TOKENS)
            # The modes alternate off, on, on, off, ...: this machine's speed drifts by ~5% over a minute,
            # as much as the difference being measured; the mirrored order cancels a steady drift.
            for rep in range(args.repeats):
                for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                    r = run_load(server.address, prompts, clients, requests, mode, args.max_tokens)
                    results.setdefault((clients, mode), LoadResult()).merge(r)
                    log(f"  {clients:>2} clients {mode:>8}: {r.tok_per_s:6.1f} tok/s, "
                        f"ttft p50 {percentile(r.ttft, 50):.3f}s")
    finally:
        server.stop()
    return results


def tables(all_results: dict[str, dict[tuple[int, str], LoadResult]], loads: list[int]) -> str:
    rows = []
    for system, results in all_results.items():
        for clients in loads:
            on, off = results[(clients, "lossless")], results[(clients, "off")]
            rows.append([
                system, str(clients), f"{on.tok_per_s:.1f}", f"{off.tok_per_s:.1f}", f"{on.tok_per_s / off.tok_per_s:.2f}x",
                f"{on.tokens / on.forwards:.2f}" if on.forwards else "-",
                f"{percentile(on.ttft, 50) * 1000:.0f} / {percentile(on.ttft, 99) * 1000:.0f}",
                f"{percentile(on.itl, 50) * 1000:.0f} / {percentile(on.itl, 99) * 1000:.0f}",
                f"{percentile(off.ttft, 50) * 1000:.0f} / {percentile(off.ttft, 99) * 1000:.0f}",
                f"{percentile(off.itl, 50) * 1000:.0f} / {percentile(off.itl, 99) * 1000:.0f}",
            ])
    main = md_table(["system", "clients", "tok/s spec on", "tok/s spec off", "on / off", "tau (on)",
                     "TTFT p50 / p99 ms (on)", "ITL p50 / p99 ms (on)", "TTFT p50 / p99 ms (off)",
                     "ITL p50 / p99 ms (off)"], rows)
    return main + "\n\n" + targets(all_results, loads)


def targets(all_results: dict[str, dict[tuple[int, str], LoadResult]], loads: list[int]) -> str:
    lines = []
    emb, dist = all_results.get("embedded"), all_results.get("distributed")
    if emb and dist and 1 in loads:
        ratio = dist[(1, "lossless")].tok_per_s / emb[(1, "lossless")].tok_per_s
        lines.append(f"- Distributed / embedded batch-1 tok/s (speculation on): **{ratio:.2f}x** (target >= 0.8x: "
                     f"{'met' if ratio >= 0.8 else 'NOT met'}).")
    for system, results in all_results.items():
        if 1 in loads and 16 in loads:
            best = max(results[(16, m)].tok_per_s for m in MODES) / max(results[(1, m)].tok_per_s for m in MODES)
            lines.append(f"- {system}: 16 clients / batch-1 aggregate tok/s (best mode at each): **{best:.2f}x** "
                         f"(target >= 5x: {'met' if best >= 5 else 'NOT met'}).")
        worst = min(results[(c, "lossless")].tok_per_s / results[(c, "off")].tok_per_s for c in loads)
        lines.append(f"- {system}: lowest speculation on / off ratio over the loads: **{worst:.2f}x** "
                     f"(target >= 0.95x: {'met' if worst >= 0.95 else 'NOT met'}).")
    return "\n".join(lines)


def command_line() -> str:
    python = Path(sys.executable)
    shown = python.relative_to(REPO_ROOT) if python.is_relative_to(REPO_ROOT) else python
    return shlex.join([str(shown), "bench/bench_serving.py", *sys.argv[1:]])


def doc_section(args: argparse.Namespace, questions: list[dict], load_average: float, body: str) -> str:
    ids = ", ".join(str(q["question_id"]) for q in questions)
    return f"""## Serving: embedded vs distributed, under load (`bench/bench_serving.py`)

- Command: `{command_line()}`, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.
- Machine: {machine_text()}. One-minute load average at start: {load_average:.2f}. The clients run in the
  benchmark's process on the same cores as the servers.
- Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), weights {args.dtype}; KV cache {args.num_blocks} blocks of 16.
- Systems: `specserve serve --embedded --spec {args.spec}` (router, verifier and drafter in one process) and
  `specserve up --spec {args.spec}` (1 verifier, 1 drafter and the router as separate processes, gRPC on
  loopback). Each is started fresh and warmed up (every prompt the loads send, at the highest load,
  {WARMUP_TOKENS} tokens, in each mode; and each load's prompts again right before it), then driven by N
  client threads, each streaming its requests (`Client.stream`) one after another. Each load runs
  {args.repeats} times per mode, the modes alternating in mirrored order (off, on, on, off, ...); the
  table sums the runs.
- Prompts: {len(questions)} Spec-Bench first-turn questions (ids {ids}), chat template applied by the router,
  cycled; max({args.min_requests}, {args.requests_per_client} x N) requests per load; greedy, {args.max_tokens} new tokens each
  (EOS ignored). Speculation per request: on (`lossless`, the server's {args.spec} drafter, budget
  adapting to load) or `off`.
- tok/s: all new tokens / wall time of the load. TTFT: request start to its first token. ITL: gap between
  streamed chunks, shared by the tokens of the chunk (a chunk of k accepted tokens gives k gaps of 1/k).

{body}"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="embedded,distributed")
    p.add_argument("--spec", default="ngram", help="the servers' drafter (default ngram)")
    p.add_argument("--loads", default="1,4,16,32", help="concurrent clients, comma-separated")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="runs of each load and mode, in mirrored order")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="smoke run: loads 1,4, 8 tokens, 4 prompts")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args()
    if args.quick:
        args.loads, args.max_tokens, args.prompts, args.min_requests = "1,4", 8, 4, 2
    args.loads = [int(x) for x in args.loads.split(",")]
    args.systems = args.systems.split(",")
    return args


def main() -> None:
    args = parse_args()
    ensure_default_model(specserve_home(os.environ))
    load_average = os.getloadavg()[0]
    questions = select_questions(args.prompts)
    prompts = [q["turns"][0] for q in questions]
    all_results = {system: measure(system, args, prompts) for system in args.systems}
    body = tables(all_results, args.loads)
    section = doc_section(args, questions, load_average, body)
    print(section)
    if not args.no_write:
        write_doc(DOC_PATH, section, DOC_START, DOC_END)
        log(f"wrote {DOC_PATH}")


if __name__ == "__main__":
    main()
