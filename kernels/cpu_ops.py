"""Builds and loads specserve's C++ CPU kernels (kernels/csrc/) as torch custom ops, once per machine.

The build is one g++ call against the installed torch's headers and libraries (no ninja, no setuptools),
with `-march=native`: the library is kept under `SPECSERVE_HOME/kernels/<key>/`, where the key hashes
the source, torch's version, the compiler and the CPU's model and flags, so a cache carried to another
machine or torch is rebuilt rather than loaded. Builds write to a temporary name and rename, so processes
that start together (a test cluster) never load a half-written file. Building takes ~15 s on 2 cores.

The ops, in the `torch.ops.specserve_cpu` namespace: `tree_attention` (tree_attention_cpu.cpp) and
`prefill_attention` with `prefill_attention_fast` (prefill_attention_cpu.cpp), used by
kernels/paged_attention.py; `linear` (linear_cpu.cpp, the float32 linears of engine/quant.py),
`int8_linear` and `int8_linear_fast` (int8_linear_cpu.cpp, the int8 ones), and from rowwise_cpu.cpp
`rms_norm` and `rope_write_kv` (engine/model.py) and `quantize_rows` (engine/quant.py).

Without a compiler, or when the build fails, `load()` returns False once with a warning and callers use
their plain-torch paths (the "torch" attention backend, oneDNN's prepacked float32 linear, fbgemm's int8
linear, F.rms_norm, the torch RoPE and quantization expressions); nothing else changes. `SPECSERVE_CPU_KERNELS=0`
forces that fallback.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # in the build key, not on the command line
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def load() -> bool:
    """Whether `torch.ops.specserve_cpu` is usable in this process; builds it on first use."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _try_load()
        return _loaded


def applies(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a `specserve_cpu` op may stand in for torch's on `x`: a float32 CPU tensor, no gradient
    wanted (the ops have no backward; training keeps torch's), and the ops loaded."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return _loaded if _loaded is not None else load()


def _try_load() -> bool:
    if os.environ.get("SPECSERVE_CPU_KERNELS", "1") == "0":
        return False
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or not SOURCES:
        warnings.warn("specserve: no C++ compiler found; CPU attention uses the slower plain-torch path", stacklevel=3)
        return False
    try:
        library = _build(compiler)
        torch.ops.load_library(str(library))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"specserve: building the CPU kernels failed, using plain torch: {str(detail)[-400:]}",
                      stacklevel=3)
        return False
    return True


def has_cpu_flag(*names: str) -> bool:
    """Whether /proc/cpuinfo lists any of these feature flags (False where there is no /proc/cpuinfo)."""
    return any(name in _cpu_flags() for name in names)


@functools.cache
def _cpu_flags() -> frozenset[str]:  # read once: Int8Linear asks for every linear it builds
    return frozenset(flag for line in _cpu_identity().splitlines() if line.startswith(("flags", "Features"))
                     for flag in line.split(":", 1)[-1].split())


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (Linux), or the platform string elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(wanted)))
    except OSError:
        return platform.processor() or platform.machine()


def _flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-O3", *arch, "-std=c++17", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}",
    ]


def _build(compiler: str) -> Path:
    from specserve.model_fetch import specserve_home

    flags = _flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join(
        [*(path.read_text() for path in [*SOURCES, *HEADERS]), torch.__version__, version, _cpu_identity(), sys.version,
         *flags]
    ).encode()).hexdigest()[:16]
    directory = specserve_home(os.environ) / "kernels" / key
    library = directory / "specserve_cpu.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix="specserve_cpu.", suffix=".so.partial", dir=directory)
    os.close(fd)
    try:
        # torch's libgomp shares the soname libgomp.so.1, so `-fopenmp` binds to the runtime torch has loaded.
        subprocess.run([compiler, *map(str, SOURCES), "-o", partial, *flags], capture_output=True, text=True, check=True)
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
    return library
