"""`specserve serve --embedded` (the Router API from one process) against plain decoding, and how `serve`
and `up` refuse a bad set-up: one line on stderr naming what is wrong, a non-zero exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from specserve.client import Client

MAX_TOKENS = 24


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specserve.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())


def test_embedded_serves_plain_greedy(launch, model_path, short_prompts, greedy_reference):
    """gRPC and the OpenAI-compatible HTTP API of one `serve --embedded` process, with the official
    `openai` client, both equal to plain greedy decoding."""
    import openai

    served = launch(["serve", "--embedded", "--spec", "ngram", "--num-blocks", "64", "--port", "0", "--http-port", "0",
                     "--speculation-budget", "static", "--model", str(model_path)], last="router")
    line = served.lines["router"]
    assert line.startswith("router grpc=127.0.0.1:") and " http=127.0.0.1:" in line and "drafters=ngram" in line
    prompts = short_prompts[:4]
    expected = greedy_reference(prompts, MAX_TOKENS)
    with Client(served.addresses["router"]) as client:
        outputs = [client.generate(prompt, max_tokens=MAX_TOKENS) for prompt in prompts]
    assert [o.token_ids for o in outputs] == expected
    assert sum(o.spec["drafted"] for o in outputs) > 0

    http = dict(f.split("=", 1) for f in line.split()[1:])["http"]
    api = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused")
    chat = api.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[0]}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == outputs[0].text
    assert chat.usage.completion_tokens == len(expected[0])
    streamed = api.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[1]}],
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == outputs[1].text


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["serve"], 2, "serve takes a role"),
        (["serve", "--embedded", "verifier"], 2, "serve takes a role"),
        (["serve", "--port", "1", "verifier"], 2, "put the flags after the role"),
        (["serve", "router", "--verifier", "127.0.0.1:1", "--drafter", "ngram"], 2, "--drafter takes NAME=HOST:PORT"),
        (["serve", "router", "--verifier", "127.0.0.1:1"], 7, "did not answer Info (UNAVAILABLE); replicas: 127.0.0.1:1"),
        (["up", "--verifiers", "0"], 2, "--verifiers must be >= 1"),
        (["serve", "verifier", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], 2,
         "--tls-cert /nonexistent/cert.pem: cannot read it"),
        (["serve", "drafter", "--spec", "ngram", "--tls-cert", "/nonexistent/cert.pem"], 2,
         "--tls-cert and --tls-key go together"),
        (["serve", "--embedded", "--tls-client-ca", "/nonexistent/ca.pem"], 2, "--tls-client-ca needs --tls-cert"),
        (["up", "--tls-ca", "/nonexistent/ca.pem"], 2, "--tls-ca without --tls-cert and --tls-key"),
        (["generate", "Hi", "--tls-ca", "/nonexistent/ca.pem"], 2, "are for --url"),
    ],
    ids=["no_role", "embedded_and_role", "flags_before_role", "drafter_without_name", "unreachable_verifier",
         "no_verifiers", "unreadable_cert", "cert_without_key", "client_ca_without_cert", "up_ca_without_cert",
         "tls_without_url"],
)
def test_bad_setup_exits_with_one_line(args, code, needle, model_path, tmp_path):
    result = run_cli([*args, "--model", str(model_path)], tmp_path)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specserve: error:") and needle in lines[0], result.stderr
    assert result.stdout == ""


def test_up_names_the_service_that_failed_to_start(tmp_path):
    result = run_cli(["up", "--verifiers", "1", "--spec", "off", "--port", "0", "--model", "/nonexistent/model.gguf"],
                     tmp_path)
    assert result.returncode == 7
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("specserve: error: verifier-0 (pid ") and "before serving" in last_line
    assert "no such file" in last_line  # the child's own error, from its stderr
    assert result.stdout == ""
