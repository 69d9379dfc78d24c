"""Session fixtures shared by every test: the default model's GGUF and the shared data directory.

Triton kernels are tested on CPU through the interpreter. `triton.jit` picks interpreter or compiler when
triton itself is first imported (torch and transformers may import it while other folders are collected),
so the variable is set here, before any test module is imported;
tests/unit/kernels/test_tree_attention.py checks that it took effect.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from specserve.errors import ModelFetchError  # noqa: E402
from specserve.model_fetch import ensure_default_model, specserve_home  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The verified default GGUF, fetched once if missing."""
    offline = os.environ.get("SPECSERVE_OFFLINE") == "1"
    try:
        return ensure_default_model(specserve_home(os.environ), offline=offline)
    except ModelFetchError as exc:
        if offline:  # an explicit offline run without the model skips; anywhere else it is a failure
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`$SPECSERVE_DATA_DIR`, else the `shared/data` folder beside the repository."""
    path = Path(os.environ.get("SPECSERVE_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        message = f"no data directory at {path}; set SPECSERVE_DATA_DIR"
        if os.environ.get("CI") == "true":  # CI always has shared/ beside the clone: missing is a failure
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tokenizer(model_path: Path):
    from specserve.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(model_path)


@pytest.fixture(scope="session")
def llama_model(model_path: Path):
    """Our float32 Llama on the real weights, shared read-only by every engine a test builds."""
    from specserve.engine.llm_engine import build_model

    return build_model(str(model_path), "float32")


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """transformers' model on the same GGUF: a test-only reference, loaded once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def spec_bench_prompts(data_dir: Path) -> list[str]:
    """First-turn questions of Spec-Bench, in file order."""
    import json

    with open(data_dir / "spec_bench" / "question.jsonl") as f:
        return [json.loads(line)["turns"][0] for line in f]
