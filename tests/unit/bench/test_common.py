"""What the benchmarks share: data and doc locations, flag checks, and rewriting one doc section."""

from __future__ import annotations

from pathlib import Path

import pytest

from specserve.bench.common import (
    DOC_HEADER, DRAFTERS, checkout_root, default_data_dir, default_doc_path, require_datastore, require_files,
    require_run_values, spec_config, write_doc,
)
from specserve.engine.config import SPEC_METHODS
from specserve.errors import InvalidRequestError

REPO_ROOT = Path(__file__).resolve().parents[3]
MARKERS = ("<!-- x:start -->", "<!-- x:end -->")


def test_write_doc_replaces_only_its_section(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"intro\n{MARKERS[0]}\nold\n{MARKERS[1]}\noutro\n")
    write_doc(doc, "new", *MARKERS)
    assert doc.read_text() == f"intro\n{MARKERS[0]}\nnew\n{MARKERS[1]}\noutro\n"


def test_write_doc_appends_a_missing_section(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("intro\n")
    write_doc(doc, "new", *MARKERS)
    assert doc.read_text() == f"intro\n\n{MARKERS[0]}\nnew\n{MARKERS[1]}\n"


def test_write_doc_creates_the_file_with_its_header(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    write_doc(doc, "new", *MARKERS)
    assert doc.read_text().startswith(DOC_HEADER) and "new" in doc.read_text()


def test_a_checkout_finds_its_root_and_doc():
    assert checkout_root() == REPO_ROOT
    assert default_doc_path() == REPO_ROOT / "docs" / "benchmarks.md"


def test_data_dir_from_the_environment_else_beside_the_checkout():
    assert default_data_dir({"SPECSERVE_DATA_DIR": "/data"}) == Path("/data")
    assert default_data_dir({}) == REPO_ROOT.parent / "shared" / "data"


def test_missing_data_file_is_one_line(tmp_path: Path):
    with pytest.raises(InvalidRequestError, match="no data file .*spec_bench/question.jsonl; pass --data-dir") as info:
        require_files(tmp_path, ["spec_bench/question.jsonl"])
    assert "\n" not in str(info.value)


def test_drafters_are_the_spec_methods_but_off():
    assert DRAFTERS == tuple(m for m in SPEC_METHODS if m != "off")
    require_run_values(DRAFTERS, "float32", max_tokens=1)
    with pytest.raises(InvalidRequestError, match="unknown drafter 'off'"):
        require_run_values(["off"], "float32")


@pytest.mark.parametrize(
    "drafters,dtype,counts,needle",
    [
        (["hydra"], "float32", {}, "unknown drafter 'hydra'"),
        (["ngram"], "float16", {}, "dtype must be one of"),
        (["ngram"], "float32", {"per_category": 0}, "--per-category must be > 0"),
    ],
)
def test_bad_run_values(drafters, dtype, counts, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        require_run_values(drafters, dtype, **counts)


def test_only_retrieval_drafters_need_and_get_the_datastore(tmp_path: Path):
    missing = tmp_path / "none.npz"
    require_datastore(["ngram"], missing)
    with pytest.raises(InvalidRequestError, match="no datastore at .* for the rest drafter"):
        require_datastore(["ngram", "rest"], missing)
    assert spec_config("ngram", 8, missing).datastore_path is None
    assert spec_config("auto", 8, missing).datastore_path == str(missing)
