# The commands of README.md. All bootstrap first (.venv, pinned dependencies, the default model);
# that is a no-op when nothing changed.
#   make run [PROMPT="..."] [MAX_TOKENS=128]   a streamed generation on the real model, embedded mode
#   make test [PYTEST_ARGS="..."]              the test suite without the slow grid (what .ci/run calls)
#   make test-slow                            only the tests marked slow (the full speculative grid)
#   make bench [BENCH_ARGS="..."]              the engine benchmark; rewrites its section of docs/benchmarks.md

VENV := .venv
PROMPT ?= Give me three practical tips for staying focused while studying.
MAX_TOKENS ?= 128
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test test-slow bench bootstrap

# The prompt's raw value, single-quoted for the shell, so quotes and `$` in it arrive unchanged.
run: bootstrap
	$(VENV)/bin/specserve generate '$(subst ','\'',$(value PROMPT))' --max-tokens $(MAX_TOKENS)

# The pytest script, not `python -m pytest`: -m would put the repo root on sys.path, where `services` and
# `kernels` must never be importable as top-level modules (only as specserve.*).
test: bootstrap
	$(VENV)/bin/pytest tests -q --durations=15 -m "not slow" $(PYTEST_ARGS)

test-slow: bootstrap
	$(VENV)/bin/pytest tests -q --durations=15 -m slow $(PYTEST_ARGS)

# A script path, for the same reason: it puts bench/, not the repo root, on sys.path. llama.cpp joins the
# comparison only where llama-cpp-python is installed (the `bench` extra).
bench: bootstrap
	$(VENV)/bin/python bench/bench_engine.py $(BENCH_ARGS)

bootstrap:
	@bash scripts/bootstrap.sh
