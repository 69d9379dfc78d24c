"""`specserve up` on loopback with the real model: two verifier and two n-gram drafter processes behind a
router process, driven through the Python client as a user would.

Every greedy output must equal plain decoding in this process token for token, whatever the concurrency,
and every verifier must end with its KV cache empty. The cluster is shared by the module's tests; the last
test stops it with SIGTERM, so it must stay last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from specserve.client import Client, Generation
from specserve.errors import DeadlineExceededError, OverloadedError, SpecserveError
from specserve.v1 import common_pb2, router_pb2, router_pb2_grpc, verifier_pb2, verifier_pb2_grpc

NUM_BLOCKS = 256  # 4096 token slots per verifier: every test's sequences fit, the cache allocates quickly
MAX_TOKENS = 24
MAX_PROMPT_CHARS = 4000
JOIN_TIMEOUT_S = 240.0  # a request still running after this counts as hung


@pytest.fixture(scope="module")
def cluster(module_launch, model_path):
    # A static draft budget, so the drafter pool takes part at any load: the default cost-aware budget may
    # rightly decide that drafting does not pay at 16 concurrent streams.
    return module_launch(["up", "--verifiers", "2", "--drafters", "2", "--spec", "ngram", "--num-blocks",
                          str(NUM_BLOCKS), "--port", "0", "--max-prompt-chars", str(MAX_PROMPT_CHARS),
                          "--speculation-budget", "static", "--model", str(model_path)], last="router")


def replicas(cluster, role: str) -> list[str]:
    return [address for name, address in cluster.addresses.items() if name.startswith(role)]


def verifier_info(address: str) -> verifier_pb2.VerifierInfo:
    with grpc.insecure_channel(address) as channel:
        return verifier_pb2_grpc.VerifierStub(channel).Info(verifier_pb2.VerifierInfoRequest(), timeout=30)


def assert_kv_free(addresses: list[str], timeout: float = 30.0) -> None:
    """Every verifier holds no sequence and every block is free, within `timeout`: the router releases a
    sequence after the step that finished it, so the client may see the last token first."""
    deadline = time.monotonic() + timeout
    while True:
        infos = [verifier_info(address) for address in addresses]
        if all(i.num_sequences == 0 and i.free_blocks == i.num_blocks == NUM_BLOCKS for i in infos):
            return
        if time.monotonic() > deadline:
            held = {a: (i.num_sequences, i.num_blocks - i.free_blocks) for a, i in zip(addresses, infos)}
            pytest.fail(f"(sequences, blocks) still held after {timeout:.0f} s: {held}")
        time.sleep(0.2)


def run_concurrently(call: Callable[[str], object], prompts: list[str]) -> list[object]:
    """call(prompt) for every prompt on its own thread, released together; each result or the SpecserveError
    it raised, in prompt order. Fails if any thread is still running after JOIN_TIMEOUT_S."""
    results: list[object] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(prompts[i])
        except SpecserveError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "requests hung"
    return results


def stream(address: str, prompt: str, max_tokens: int = MAX_TOKENS, **options) -> Generation:
    """One streaming request (greedy unless `options` say otherwise) from its own client, its chunks gathered."""
    with Client(address) as client:
        chunks = list(client.stream(prompt, max_tokens=max_tokens, **options))
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    return Generation("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                      chunks[0].prompt_token_ids, chunks[-1].finish_reason, chunks[-1].spec, chunks[-1].usage, 0.0)


def test_up_prints_one_line_per_service(cluster):
    assert sorted(cluster.lines) == ["drafter-0", "drafter-1", "router", "verifier-0", "verifier-1"]
    assert all("method=ngram" in cluster.lines[f"drafter-{i}"] for i in range(2))
    assert all(address.startswith("127.0.0.1:") for address in cluster.addresses.values())
    assert len(set(cluster.addresses.values())) == 5


def test_concurrent_streams_equal_plain_greedy(cluster, short_prompts, greedy_reference, tokenizer):
    outputs = run_concurrently(lambda p: stream(cluster.addresses["router"], p), short_prompts)
    assert all(isinstance(o, Generation) for o in outputs), outputs
    assert [o.token_ids for o in outputs] == greedy_reference(short_prompts, MAX_TOKENS)
    assert [o.prompt_token_ids for o in outputs] == \
        [tokenizer.render_prompt_ids([{"role": "user", "content": p}]) for p in short_prompts]
    assert sum(o.spec["drafted"] for o in outputs) > 0  # the drafter pool took part
    assert_kv_free(replicas(cluster, "verifier"))


def test_logprobs_cross_the_process_boundaries(cluster, short_prompts):
    """Verifier replica -> router -> client, each in its own process."""
    with Client(cluster.addresses["router"]) as client:
        generation = client.generate(short_prompts[0], max_tokens=8, logprobs=2)
    assert [lp.token_id for lp in generation.logprobs] == generation.token_ids and len(generation.token_ids) == 8
    assert all(lp.top[0][0] == lp.token_id and lp.logprob == lp.top[0][1] < 0 for lp in generation.logprobs)


def test_cancelled_stream_frees_its_kv(cluster, short_prompts):
    with Client(cluster.addresses["router"]) as client:
        chunks = client.stream(short_prompts[0], max_tokens=1000, ignore_eos=True)
        next(chunks), next(chunks)  # tokens are flowing
        held = sum(verifier_info(address).num_sequences for address in replicas(cluster, "verifier"))
        chunks.close()  # cancels the call
    assert held == 1
    assert_kv_free(replicas(cluster, "verifier"))


def test_tiny_deadline_ends_with_deadline_exceeded(cluster, short_prompts):
    with Client(cluster.addresses["router"]) as client:
        with pytest.raises(DeadlineExceededError) as raised:
            client.generate(short_prompts[1], max_tokens=1000, ignore_eos=True, timeout=0.5)
    assert raised.value.code == "DEADLINE_EXCEEDED"
    assert_kv_free(replicas(cluster, "verifier"))


BAD_REQUESTS = {
    "empty_prompt": (router_pb2.GenerateRequest(prompt=""), "prompt is empty"),
    "unknown_drafter": (router_pb2.GenerateRequest(prompt="Hi", drafter="nope"), "unknown drafter 'nope'"),
    "negative_max_tokens": (router_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=-1)),
                            "max_tokens"),
    "oversize_prompt": (router_pb2.GenerateRequest(prompt="x" * (MAX_PROMPT_CHARS + 1)),
                        f"the limit is {MAX_PROMPT_CHARS}"),
}


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument(cluster, case, method):
    """Sent as raw messages: the client SDK refuses some of these before they leave the process."""
    request, needle = BAD_REQUESTS[case]
    with grpc.insecure_channel(cluster.addresses["router"]) as channel:
        call = getattr(router_pb2_grpc.RouterStub(channel), method)
        with pytest.raises(grpc.RpcError) as raised:
            response = call(request, timeout=60)
            if method == "GenerateStream":
                list(response)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in raised.value.details()


def test_invalid_utf8_prompt_is_invalid_argument(cluster):
    request = router_pb2.GenerateRequest(prompt="AAAA", sampling=common_pb2.SamplingParams(max_tokens=2))
    good = request.SerializeToString()
    bad = good.replace(b"AAAA", b"\xff\xfeAA")  # same length: the message still parses, the string is not UTF-8
    assert bad != good
    with grpc.insecure_channel(cluster.addresses["router"]) as channel:
        generate = channel.unary_unary("/specserve.v1.Router/Generate")  # no serializers: bytes in, bytes out
        with pytest.raises(grpc.RpcError) as raised:
            generate(bad, timeout=60)
        assert router_pb2.GenerateResponse.FromString(generate(good, timeout=60)).token_ids  # only the bytes differ
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed GenerateRequest" in raised.value.details()


def test_flood_beyond_the_queue_is_refused_not_hung(cluster, launch, model_path, short_prompts, greedy_reference):
    pool = [flag for address in replicas(cluster, "verifier") for flag in ("--verifier", address)]
    pool += [flag for address in replicas(cluster, "drafter") for flag in ("--drafter", f"ngram={address}")]
    router = launch(["serve", "router", "--port", "0", "--max-queue", "2", "--max-num-seqs", "2", *pool,
                     "--model", str(model_path)], last="router")
    prompts = short_prompts[:12]
    with Client(router.addresses["router"]) as client:
        client.info()  # connected before the flood, so the requests arrive together
        outcomes = run_concurrently(lambda p: client.generate(p, max_tokens=MAX_TOKENS), prompts)
    refused = [o for o in outcomes if isinstance(o, OverloadedError)]
    served = {p: o.token_ids for p, o in zip(prompts, outcomes) if isinstance(o, Generation)}
    assert len(refused) + len(served) == len(prompts), outcomes
    assert refused and all(o.code == "RESOURCE_EXHAUSTED" for o in refused)
    assert served and list(served.values()) == greedy_reference(list(served), MAX_TOKENS)
    assert_kv_free(replicas(cluster, "verifier"))


def test_killed_verifier_costs_a_reprefill_not_a_token(cluster, launch, model_path, short_prompts, greedy_reference):
    """A spare verifier and one of the cluster's behind a new router; SIGKILL the spare while it holds
    sequences: they are re-prefilled on the other and finish exactly as plain decoding would."""
    spare = launch(["serve", "verifier", "--port", "0", "--num-blocks", str(NUM_BLOCKS), "--model", str(model_path)],
                   last="verifier")
    survivor = cluster.addresses["verifier-0"]
    router = launch(["serve", "router", "--port", "0", "--verifier", spare.addresses["verifier"], "--verifier",
                     survivor, "--drafter", f"ngram={cluster.addresses['drafter-0']}", "--model", str(model_path)],
                    last="router")
    prompts, max_tokens = short_prompts[:8], 64
    finished_at: dict[str, float] = {}

    def request(prompt: str) -> Generation:
        generation = stream(router.addresses["router"], prompt, max_tokens)
        finished_at[prompt] = time.monotonic()
        return generation

    results: list[list[object]] = []
    clients = threading.Thread(target=lambda: results.append(run_concurrently(request, prompts)), daemon=True)
    clients.start()
    deadline = time.monotonic() + 120
    while verifier_info(spare.addresses["verifier"]).num_sequences == 0:
        assert time.monotonic() < deadline, "the spare verifier never got a sequence"
        time.sleep(0.05)
    spare.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    clients.join(JOIN_TIMEOUT_S + 10)
    assert not clients.is_alive(), "requests hung"
    [outputs] = results
    assert all(isinstance(o, Generation) for o in outputs), outputs
    assert any(finished_at[p] > killed_at for p in prompts)  # the kill came mid-generation
    assert [o.token_ids for o in outputs] == greedy_reference(prompts, max_tokens)
    assert_kv_free([survivor])


def test_second_server_on_a_port_in_use_fails(cluster, model_path, workdir):
    """gRPC's default SO_REUSEPORT would let a second router share the first one's port without a word."""
    port = cluster.addresses["router"].rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "specserve.cli", "serve", "router", "--port", port, "--verifier",
                             cluster.addresses["verifier-0"], "--model", str(model_path)],
                            cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 7, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"specserve: error: could not bind 127.0.0.1:{port}: in use, or not an address of this host"


def child_processes(pid: int) -> dict[int, str]:
    """Live (not zombie) children of `pid` and their command lines, from /proc."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(ppid) == pid and state != "Z":
            children[int(entry.name)] = cmdline
    return children


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def up_with_untrained(launch, model_path, workdir, kind: str, drafter: torch.nn.Module, fingerprint: str):
    """`up` with one verifier and one drafter replica serving `drafter` (untrained) from a checkpoint, at a
    static draft budget; and the checkpoint's path."""
    from specserve.learned.checkpoint import DraftCheckpoint, save_checkpoint

    checkpoint = workdir / f"{kind}-untrained.safetensors"
    save_checkpoint(checkpoint, DraftCheckpoint(kind, drafter.state_dict(), drafter.config.to_dict(), fingerprint,
                                                {}, "untrained"))
    up = launch(["up", "--verifiers", "1", "--drafters", "1", "--spec", kind, "--draft-checkpoint", str(checkpoint),
                 "--speculation-budget", "static", "--num-blocks", str(NUM_BLOCKS), "--port", "0",
                 "--model", str(model_path)], last="router")
    return up, checkpoint


def test_up_with_a_feature_drafter_equals_plain_greedy(launch, model_path, workdir, llama_model, short_prompts,
                                                      greedy_reference):
    """`up --spec eagle`: the verifier keeps hidden states, returns them with each Verify, and the router
    passes each drafter replica only the rows it has not had. An untrained head (drafts are mostly
    rejected) still drafts, and every output equals plain greedy decoding."""
    from specserve.learned.checkpoint import target_fingerprint
    from specserve.learned.eagle_head import new_eagle_head

    torch.manual_seed(0)
    head = new_eagle_head(llama_model, torch.arange(4096))
    up, _ = up_with_untrained(launch, model_path, workdir, "eagle", head, target_fingerprint(llama_model))
    prompts = short_prompts[:4]
    outputs = run_concurrently(lambda p: stream(up.addresses["router"], p), prompts)
    assert all(isinstance(o, Generation) for o in outputs), outputs
    assert [o.token_ids for o in outputs] == greedy_reference(prompts, MAX_TOKENS)
    assert sum(o.spec["drafted"] for o in outputs) > 0
    assert_kv_free(replicas(up, "verifier"))


def test_up_with_a_draft_model_samples_its_drafts_like_one_process(launch, model_path, workdir, short_prompts,
                                                                   llama_model, tokenizer):
    """`up --spec draft-model` at temperature 1: the router sends each draft item the request's sampling
    settings, the drafter replica samples its chains from its own distribution and returns that
    distribution with the tree, and the verifier accepts by rejection sampling against it. Seeded requests
    give the tokens the same router, drafter and verifier give in one process (every draw is keyed by seed
    and position, so nothing may be lost between processes), every time, and every block comes back."""
    from specserve.engine.config import CacheConfig, SamplingParams, SpecConfig
    from specserve.learned.checkpoint import target_fingerprint
    from specserve.learned.draft_model import new_draft_model
    from specserve.learned.train_draft import load_float32_target
    from specserve.router.core import RouterConfig
    from specserve.router.server import embedded_router

    target = load_float32_target(str(model_path))
    model = new_draft_model(target, torch.arange(4096), (0, 1, 2, 3))  # the target's untrained early exit
    up, checkpoint = up_with_untrained(launch, model_path, workdir, "draft-model", model, target_fingerprint(target))
    prompts = short_prompts[:4]

    def sampled(prompt: str) -> Generation:
        return stream(up.addresses["router"], prompt, temperature=1.0, seed=prompts.index(prompt))

    first, again = run_concurrently(sampled, prompts), run_concurrently(sampled, prompts)
    assert all(isinstance(o, Generation) for o in first + again), first + again
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) == len(prompts)
    assert sum(o.spec["drafted"] for o in first) > 0
    assert_kv_free(replicas(up, "verifier"))

    spec = SpecConfig(method="draft-model", draft_checkpoint=str(checkpoint))
    router = embedded_router(llama_model, tokenizer, "float32", ["draft-model"], CacheConfig(num_blocks=NUM_BLOCKS),
                             RouterConfig(speculation_budget="static"), spec=spec).start()
    try:
        handles = [router.submit(o.prompt_token_ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=k))
                   for k, o in enumerate(first)]
        assert [[t for out in h for t in out.token_ids] for h in handles] == [o.token_ids for o in first]
    finally:
        router.stop()


def test_up_stops_everything_when_a_child_dies(launch, model_path):
    up = launch(["up", "--verifiers", "1", "--spec", "off", "--num-blocks", "16", "--port", "0",
                 "--model", str(model_path)], last="router")
    children = child_processes(up.process.pid)
    [verifier] = [pid for pid, cmdline in children.items() if " serve verifier " in cmdline]
    assert len(children) == 2  # the verifier and the router
    os.kill(verifier, signal.SIGKILL)
    assert up.process.wait(60) != 0
    last_line = up.stderr().strip().splitlines()[-1]
    assert last_line.startswith("specserve: error: verifier-0") and "exited with code -9" in last_line
    assert not any(alive(pid) for pid in children)


def test_sigterm_stops_every_child(cluster):
    """Last: it stops the module's cluster."""
    children = child_processes(cluster.process.pid)
    assert len(children) == 5
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(60) == 0
    assert not any(alive(pid) for pid in children)
