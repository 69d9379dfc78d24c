"""Session fixtures shared by every test: the default model's GGUF and the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from specserve.errors import ModelFetchError
from specserve.model_fetch import ensure_default_model, specserve_home

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
        pytest.skip(f"no data directory at {path}; set SPECSERVE_DATA_DIR")
    return path
