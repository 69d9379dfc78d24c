"""The one import namespace: `services/` installs as `specserve`, `kernels/` as `specserve.kernels`.

Checked for a built wheel and for an editable install, each of a copy of the checkout (so building never
touches the repo) and each imported in a fresh interpreter whose working directory is not the repo root,
so the repo's own `services/` and `kernels/` folders cannot shadow anything. Offline: pip builds with the
setuptools already in the venv and installs with --no-index --no-deps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as.
PACKAGE_DIRS = {"services": "specserve", "kernels": "specserve/kernels"}
# What the build never reads; everything else is copied, so new packaging inputs are picked up.
NOT_COPIED = (".git", ".venv", ".cache", ".pytest_cache", "build", "dist", "*.egg-info", "__pycache__")

# Prints where `specserve` and `specserve.kernels` come from, and where (if anywhere) the top-level
# names `services` and `kernels` would resolve.
PROBE = """
import importlib.util, json, specserve, specserve.kernels
def origin(name):
    spec = importlib.util.find_spec(name)
    return spec and spec.origin
print(json.dumps({"specserve": specserve.__file__, "specserve.kernels": specserve.kernels.__file__,
                  "services": origin("services"), "kernels": origin("kernels")}))
"""


def pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--no-input", "--disable-pip-version-check", "--no-index"]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


def probe(cwd: Path, path_first: Path, *, process_pth: bool) -> dict[str, str | None]:
    """Run PROBE under `python -S` with `path_first` ahead of the venv's site-packages (for dependencies).

    -S keeps the venv's own editable install of the checkout out of the way; `process_pth` runs the .pth
    files of `path_first`, which is how an editable install hooks its import finder in.
    """
    site_packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path_first), *sorted(site_packages)])}
    code = (f"import site; site.addsitedir({str(path_first)!r})\n" if process_pth else "") + PROBE
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_one_namespace(found: dict[str, str | None], specserve_dir: Path, kernels_dir: Path) -> None:
    assert Path(found["specserve"]) == specserve_dir / "__init__.py"
    assert Path(found["specserve.kernels"]) == kernels_dir / "__init__.py"
    assert found["services"] is None, f"a top-level `services` module is importable: {found['services']}"
    assert found["kernels"] is None, f"a top-level `kernels` module is importable: {found['kernels']}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def source_copy(workdir: Path) -> Path:
    src = workdir / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(*NOT_COPIED))
    return src


@pytest.fixture(scope="module")
def wheel(workdir: Path, source_copy: Path) -> Path:
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(workdir / "dist"), str(source_copy), cwd=workdir)
    (built,) = (workdir / "dist").glob("specserve-*.whl")
    return built


def test_wheel_holds_only_the_specserve_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top_level - dist_info == {"specserve"}


def test_wheel_holds_every_source_module(wheel: Path) -> None:
    """Catches a subpackage missing from pyproject's explicit `packages` list, or C++ kernel sources
    missing from its package data (the installed package compiles them on first use)."""
    expected = {
        f"{package}/{path.relative_to(REPO_ROOT / folder).as_posix()}"
        for folder, package in PACKAGE_DIRS.items()
        for pattern in ("*.py", "*.cpp")
        for path in (REPO_ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts
    }
    with zipfile.ZipFile(wheel) as archive:
        missing = expected - set(archive.namelist())
    assert not missing, f"not in the wheel (list their packages in pyproject.toml): {sorted(missing)}"


def test_wheel_install_imports_one_namespace(workdir: Path, wheel: Path) -> None:
    target = workdir / "target"
    pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=workdir)
    found = probe(workdir, target, process_pth=False)
    assert_one_namespace(found, target / "specserve", target / "specserve" / "kernels")


def test_editable_install_imports_one_namespace(workdir: Path, source_copy: Path) -> None:
    # --ignore-installed: without it pip would uninstall the venv's own editable install of the checkout.
    prefix = workdir / "editable"
    pip("install", "--no-deps", "--no-build-isolation", "--ignore-installed", "--prefix", str(prefix),
        "-e", str(source_copy), cwd=workdir)
    site_dir = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    found = probe(workdir, site_dir, process_pth=True)
    assert_one_namespace(found, source_copy / "services", source_copy / "kernels")


def test_this_test_run_cannot_import_the_repo_folders_top_level() -> None:
    for name in ("services", "kernels"):
        spec = importlib.util.find_spec(name)
        assert spec is None, (
            f"`{name}` imports as a top-level module from {spec.origin}: run the suite with `make test` "
            "(the pytest script), not `python -m pytest` from the repo root"
        )
