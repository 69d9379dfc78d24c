"""`specserve` CLI as a user runs it: a real process, the real model, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Run from a scratch folder so the repo's `services/` can never be imported as a top-level module.
    return subprocess.run(
        [sys.executable, "-m", "specserve.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specserve") and needle in lines[0], result.stderr
    assert result.stdout == ""


def test_generate_json_is_one_object(model_path, tmp_path):
    result = run_cli("generate", "What is 2 + 2?", "--max-tokens", "12", "--json", "--model", str(model_path),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "stats"}
    assert {"new_tokens", "seconds", "tokens_per_s"} <= set(out["stats"])
    assert out["stats"]["new_tokens"] == len(out["token_ids"]) > 0
    assert out["finish_reason"] in ("stop", "length") and out["text"]


def test_generate_streams_text_and_summary(model_path, tmp_path):
    # With a bfloat16 KV cache, which changes nothing else a user sees.
    result = run_cli("generate", "Once upon a time", "--raw", "--max-tokens", "8", "--temperature", "0.8",
                     "--seed", "7", "--kv-dtype", "bfloat16", "--model", str(model_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    summary = result.stderr.strip().splitlines()[-1]
    assert "8 tokens" in summary and "tok/s" in summary


def test_fixed_seed_gives_same_json(model_path, tmp_path):
    args = ("generate", "Name a fruit.", "--max-tokens", "10", "--temperature", "1.0", "--top-k", "40",
            "--seed", "42", "--json", "--model", str(model_path))
    first, second = (json.loads(run_cli(*args, cwd=tmp_path).stdout) for _ in range(2))
    assert first["token_ids"] == second["token_ids"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (("generate", ""), "prompt is empty"),
        (("generate", "hi", "--max-tokens", "0"), "max_tokens"),
        (("generate", "hi", "--temperature", "-1"), "temperature"),
        (("generate", "hi", "--top-p", "0"), "top_p"),
        (("generate", "hi", "--top-p", "1.5"), "top_p"),
        (("generate", "hi", "--logprobs", "21"), "logprobs must be between 0 and 20"),
        (("generate", "hi", "--presence-penalty", "3"), "presence_penalty must be in [-2, 2]"),
        (("generate", "hi", "--model", "/nonexistent/model.gguf"), "no such file"),
        (("generate", "hi", "--spec", "hydra"), "unknown drafter 'hydra'"),
        (("generate", "hi", "--spec", "ngram", "--num-draft-tokens", "0"), "budgets must be > 0"),
        (("generate", "hi", "--spec", "rest", "--datastore", "/nonexistent/ds.npz"), "no datastore at"),
        (("generate", "hi", "--spec", "ngram", "--lossy", "--lossy-min-ratio", "2"), "min_ratio"),
        (("generate", "hi", "--spec", "early-exit", "--exit-layer", "0"), "exit_layer must be >= 1"),
        (("generate", "hi", "--spec", "early-exit", "--exit-layer", "30"), "exit_layer must be in [1, 29]"),
        (("generate", "hi", "--spec", "medusa", "--draft-checkpoint", "/nonexistent/m.safetensors"),
         "train-draft --kind medusa"),
        (("generate", "hi", "--spec", "draft-model", "--draft-checkpoint", "/nonexistent/d.safetensors"),
         "train-draft --kind draft-model"),
        (("serve", "--embedded", "--spec", "eagle,medusa"), "cannot be served together"),
        (("train-draft", "--kind", "draft-model", "--draft-layers", "0,x"), "comma-separated layer numbers"),
        (("train-draft", "--kind", "draft-model", "--draft-layers", "0,30"), "draft layers must be target layers"),
        (("generate", "hi", "--spec", "exit-head", "--draft-checkpoint", "/nonexistent/e.safetensors"),
         "train-draft --kind exit-head"),
        (("train-draft", "--kind", "exit-head", "--exit-layer", "30"), "exit_layer must be in [1, 29]"),
        (("train-draft", "--kind", "eagle", "--loss", "on-policy"), "on-policy is the draft model's"),
    ],
)
def test_bad_input_exits_with_one_line(args, needle, tmp_path):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), needle)


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    assert_one_line_error(run_cli("generate", "hi", "--model", str(bad), cwd=tmp_path), str(bad))


def test_prompt_longer_than_context(model_path, tmp_path):
    result = run_cli("generate", "word " * 9000, "--raw", "--model", str(model_path), cwd=tmp_path)
    assert_one_line_error(result, "context")


def test_pull_is_idempotent_with_a_good_copy(model_path, tmp_path):
    env_home = model_path.parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "pull"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env={**os.environ, "SPECSERVE_HOME": str(env_home), "SPECSERVE_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(model_path)


def test_corrupt_datastore_is_one_line(model_path, tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(os.urandom(2048))
    result = run_cli("generate", "hi", "--spec", "rest", "--datastore", str(bad), "--model", str(model_path),
                     cwd=tmp_path)
    assert_one_line_error(result, str(bad))


@pytest.mark.parametrize("spec_args", [("--spec", "ngram"), ("--spec", "early-exit", "--exit-layer", "24")])
def test_speculative_json_reports_its_counters(model_path, tmp_path, spec_args):
    result = run_cli("generate", "Repeat exactly: one two three, one two three, one two three.", *spec_args,
                     "--max-tokens", "24", "--json", "--logprobs", "1", "--model", str(model_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [lp["token_id"] for lp in out["logprobs"]] == out["token_ids"]
    assert all(lp["logprob"] <= 0 and len(lp["top"]) == 1 for lp in out["logprobs"])
    spec = out["stats"]["spec"]
    assert spec["method"] == spec_args[1]
    assert spec["forwards"] >= 1 and spec["accepted"] <= spec["drafted"]
    assert spec["mean_accepted_len"] == pytest.approx(len(out["token_ids"]) / spec["forwards"], abs=1e-3)


# --- specserve bench ---

@pytest.mark.parametrize(
    "args,needle",
    [
        (("bench", "spec", "--drafters", "ngram,hydra"), "unknown drafter 'hydra'"),
        (("bench", "lossy", "--drafter", "off"), "unknown drafter 'off'"),
        (("bench", "spec", "--per-category", "0"), "--per-category must be > 0"),
        (("bench", "spec", "--temperature", "-1"), "--temperature must be >= 0"),
        (("bench", "spec", "--drafters", "ngram:guess", "--temperature", "1"), "for learned drafters"),
        (("bench", "spec", "--drafters", "exit-head:guess"), "compared at --temperature > 0"),
        (("bench", "spec", "--drafters", "hydra:guess", "--temperature", "1"), "unknown drafter 'hydra'"),
        (("bench", "spec", "--data-dir", "/nonexistent/data"), "no data file /nonexistent/data/spec_bench"),
        (("bench", "lossy", "--data-dir", "/nonexistent/data"), "no data file /nonexistent/data/gsm8k"),
        (("bench", "spec", "--drafters", "rest", "--datastore", "/nonexistent/ds.npz"), "no datastore at"),
        (("bench", "lossy", "--lossy-settings", "2:0.5"), "top_k:min_ratio:budget"),
    ],
)
def test_bench_bad_input_exits_2_with_one_line(args, needle, model_path, tmp_path):
    result = run_cli(*args, "--no-write", cwd=tmp_path)
    assert_one_line_error(result, needle)
    assert result.returncode == 2


def test_bench_doc_in_a_missing_folder_exits_2_with_one_line(model_path, tmp_path):
    result = run_cli("bench", "lossy", "--doc", str(tmp_path / "no" / "benchmarks.md"), cwd=tmp_path)
    assert_one_line_error(result, "no directory")
    assert result.returncode == 2


def test_bench_spec_quick_covers_every_category(model_path, data_dir, tmp_path):
    result = run_cli("bench", "spec", "--quick", "--no-hf", "--no-write", "--per-category", "1", "--max-tokens", "8",
                     "--drafters", "ngram", "--data-dir", str(data_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("| category | specserve plain tok/s | specserve ngram tok/s | specserve ngram vs plain "
                        "| specserve ngram tau |")
    rows = {line.split("|")[1].strip(" *"): line.split("|")[2:-1] for line in lines[2:] if line.startswith("| ")}
    with open(data_dir / "spec_bench" / "question.jsonl") as f:
        categories = {json.loads(line)["category"] for line in f}
    assert set(rows) == categories | {"humaneval", "gsm8k", "Spec-Bench mix"}
    assert all(float(cells[-1]) >= 1.0 for cells in rows.values())  # tau: at least one token per forward
    assert "Targets of the issue" in result.stdout and "wrote" not in result.stdout


def test_bench_lossy_writes_its_section(model_path, data_dir, tmp_path):
    doc = tmp_path / "benchmarks.md"
    result = run_cli("bench", "lossy", "--problems", "2", "--max-tokens", "16", "--data-dir", str(data_dir),
                     "--doc", str(doc), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| lossless", "| lossy"))]
    assert len(rows) == 5  # lossless, the default, three more
    assert rows[0].endswith("| 1.00x | 0/2 | 2/2 | 0 / 0 |") and rows[1].startswith("| lossy (default) | 3 | 0.3 | 8 |")
    assert result.stdout.rstrip().endswith(f"2 problems, NOT met\n\nwrote {doc}")  # under 200 problems never meets it
    text = doc.read_text()
    assert "<!-- bench_lossy:start -->\n## Lossy acceptance" in text
    assert text.rstrip().endswith("<!-- bench_lossy:end -->")
    assert "`specserve bench lossy --problems 2 --max-tokens 16 --data-dir" in text


# --- specserve generate --url (through a router; a scripted one here) ---

class TwoChunkRouter:
    """Streams "abcd" as two chunks and keeps the requests it got."""

    def __init__(self) -> None:
        self.requests = []

    def GenerateStream(self, request, context):
        from specserve.v1 import common_pb2, router_pb2

        self.requests.append(request)
        yield router_pb2.TokenChunk(token_ids=[10, 11], text="ab", prompt_token_ids=[1, 2, 3])
        yield router_pb2.TokenChunk(token_ids=[12, 13], text="cd", finished=True, finish_reason="length",
                                    spec=common_pb2.SpecStats(forwards=2, tokens=4, mean_accepted_len=2.0),
                                    usage=router_pb2.Usage(prompt_tokens=3, completion_tokens=4))

    def Generate(self, request, context):
        raise NotImplementedError("the CLI streams")

    def Info(self, request, context):
        raise NotImplementedError("the CLI streams")


@pytest.fixture
def router():
    """(servicer, address) of a scripted router on a free loopback port."""
    from specserve.rpc.server import RpcServer
    from specserve.v1 import router_pb2

    servicer = TwoChunkRouter()
    server = RpcServer([(servicer, router_pb2.DESCRIPTOR.services_by_name["Router"])], "127.0.0.1:0").start()
    yield servicer, server.address
    server.drain(0)


def test_url_json_has_the_local_schema(router, capsys):
    from specserve.cli import main
    from specserve.engine.verify import SpecStats

    assert main(["generate", "hi", "--url", router[1], "--spec", "ngram", "--max-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["text"], out["token_ids"], out["prompt_token_ids"]) == ("abcd", [10, 11, 12, 13], [1, 2, 3])
    assert set(out["stats"]) == {"new_tokens", "seconds", "tokens_per_s", "prompt_tokens", "time_to_first_token_s",
                                 "load_seconds", "dtype", "spec"}
    assert set(out["stats"]["spec"]) == {"method", "draft_seconds", "forward_seconds", *SpecStats().as_dict()}
    assert out["stats"]["spec"]["method"] == "ngram" and out["stats"]["new_tokens"] == 4


@pytest.mark.parametrize("flags,speculation,drafter", [
    ((), "SPEC_MODE_UNSPECIFIED", ""),  # the router's default
    (("--spec", "off"), "SPEC_MODE_OFF", ""),
    (("--spec", "rest"), "SPEC_MODE_LOSSLESS", "rest"),
    (("--spec", "ngram", "--lossy", "--lossy-budget", "4"), "SPEC_MODE_LOSSY", "ngram"),
])
def test_url_passes_the_spec_choice(router, capsys, flags, speculation, drafter):
    from specserve.cli import main
    from specserve.v1 import common_pb2

    assert main(["generate", "hi", "--url", router[1], "--temperature", "0.5", "--seed", "3", *flags]) == 0
    [request] = router[0].requests
    assert (common_pb2.SpecMode.Name(request.speculation), request.drafter) == (speculation, drafter)
    assert request.prompt == "hi" and request.sampling.seed == 3 and request.sampling.temperature == 0.5
    assert request.lossy.budget == (4.0 if "--lossy" in flags else 0.0)
    streamed = capsys.readouterr()
    assert streamed.out == "abcd\n" and "4 tokens in" in streamed.err and f"router={router[1]}" in streamed.err


def test_url_refuses_engine_flags(router, tmp_path):
    result = run_cli("generate", "hi", "--url", router[1], "--model", "x.gguf", cwd=tmp_path)
    assert_one_line_error(result, "--model configure the local engine")
    assert result.returncode == 2 and router[0].requests == []


def test_url_unreachable_is_one_line(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    result = run_cli("generate", "hi", "--url", address, cwd=tmp_path)
    assert_one_line_error(result, f"router at {address}: ")
    assert result.returncode == 7  # UnavailableError


@pytest.mark.parametrize("argv", [["serve", "verifier"], ["serve", "--embedded"], ["up"]])
def test_kv_dtype_reaches_the_verifiers_cache(argv):
    from specserve.cli import build_parser
    from specserve.cli_serve import cache_config

    parser = build_parser()
    assert cache_config(parser.parse_args([*argv, "--kv-dtype", "bfloat16"])).dtype == "bfloat16"
    assert cache_config(parser.parse_args(argv)).dtype == "float32"


def test_auto_picks_the_best_trained_default_checkpoint(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from specserve.cli import build_parser
    from specserve.cli_common import drafter_sources
    from specserve.learned.checkpoint import FORMAT, FORMAT_VERSION

    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path))
    args = build_parser().parse_args(["generate", "hi", "--spec", "auto"])
    assert drafter_sources(args, ["auto"])["draft_checkpoint"] is None  # nothing trained: n-gram (+ retrieval)
    (tmp_path / "drafters").mkdir()
    for kind, step1 in (("eagle", 0.2), ("draft-model", 0.4)):
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind,
                    "heldout": json.dumps({"step1": step1})}
        save_file({"w": torch.zeros(1)}, str(tmp_path / "drafters" / f"{kind}.safetensors"), metadata=metadata)
    assert drafter_sources(args, ["auto"])["draft_checkpoint"] == str(tmp_path / "drafters" / "draft-model.safetensors")
