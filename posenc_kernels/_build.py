"""Build facts shared by the ahead-of-time build (``setup.py``) and the just-in-time one (``_native.py``):
sources, source hash, CUDA toolkit, GPU architectures. Standard library only: ``setup.py`` loads this file
by path, without importing the package.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

# What csrc/ ships (setup.py's package_data) and the source hash covers: its top level (not csrc/compat/,
# which only scripts/check_cuda_compile uses).
SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h", "*.cuh", "*.hpp")

# Built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: sm_80 code runs on Ampere and Ada, sm_90
# on Hopper, compute_90 PTX on newer cards (docs/install.md); older cards need TORCH_CUDA_ARCH_LIST.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# The extension's translation units (relative to csrc/), for setup.py, _native.py and
# scripts/check_cuda_compile. Link order: CPU_SOURCES, CUDA_KERNELS + CUDA_GLUE, then CPU_ISA_VARIANTS last:
# the linker keeps the first copy of an inline function, which must be the baseline's (csrc/cpu_variant.h).
CPU_SOURCES = ("bindings.cpp", "rope_cpu_ops.cpp", "rope_cpu.cpp", "sinusoidal_cpu.cpp", "learned_cpu.cpp")
# Each recompiles a kernel file for a wider ISA by `#pragma GCC target` (no extra compiler flags).
CPU_ISA_VARIANTS = ("rope_cpu_avx2.cpp", "rope_cpu_avx512.cpp", "sinusoidal_cpu_avx2.cpp", "sinusoidal_cpu_avx512.cpp")
CUDA_KERNELS = ("rope_cuda.cu", "sinusoidal_cuda.cu")  # nvcc; no torch header
CUDA_GLUE = ("cuda_ops.cpp",)  # the C++ torch glue of the CUDA kernels (c10/cuda headers)


def extension_sources(csrc: Path, cuda: bool) -> list[Path]:
    """Every translation unit of the extension in link order (see :data:`CPU_SOURCES`)."""
    names = CPU_SOURCES + ((CUDA_KERNELS + CUDA_GLUE) if cuda else ()) + CPU_ISA_VARIANTS
    return [Path(csrc) / n for n in names]


# Embedded in the ahead-of-time module (see setup.py): what it was built from, read without loading it.
BUILD_INFO_MARKER = b"POSENC_BUILD_INFO:"


def source_files(csrc: Path) -> list[Path]:
    """The files of ``csrc`` the extension is built from, in a stable order."""
    files = {p for pat in SOURCE_PATTERNS for p in Path(csrc).glob(pat) if p.is_file()}
    return sorted(files, key=lambda p: p.name)


def source_hash(csrc: Path) -> str:
    """Hash of the names and contents of :func:`source_files` (not their paths or timestamps)."""
    h = hashlib.sha256()
    for p in source_files(csrc):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _toolkit_ok(d: Path) -> bool:
    return (d / "bin" / "nvcc").is_file() and (d / "include" / "cuda_runtime.h").is_file()


def _run(*cmd: str) -> str:
    """stdout and stderr of ``cmd`` ("" when it cannot be run)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout + out.stderr


@functools.lru_cache(maxsize=None)
def _nvcc_top(nvcc: str) -> Optional[Path]:
    """The toolkit an nvcc (maybe a wrapper script) really runs from: its ``-dryrun`` prints ``TOP=``."""
    m = re.search(r"^#\$ TOP=(.*)$", _run(nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull), re.M)
    return Path(m.group(1).strip()).resolve() if m else None


def find_cuda_home() -> tuple[Optional[str], str]:
    """``(toolkit root, how it was found)``, or ``(None, why not)``. A toolkit has ``bin/nvcc`` and
    ``include/cuda_runtime.h``; looked for in ``$CUDA_HOME``, ``$CUDA_PATH``, the toolkit of the ``nvcc`` on
    PATH (through symlinks and wrapper scripts, where torch guesses wrong), ``/usr/local/cuda``, then the
    newest ``/usr/local/cuda-*``."""
    rejected = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v:
            if _toolkit_ok(Path(v)):
                return str(Path(v)), f"${var}"
            rejected.append(f"${var}={v} has no bin/nvcc + include/cuda_runtime.h")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve().parent.parent
        if _toolkit_ok(real):
            return str(real), f"nvcc on PATH ({nvcc})"
        top = _nvcc_top(nvcc)
        if top is not None and _toolkit_ok(top):
            return str(top), f"nvcc on PATH ({nvcc} runs {top}/bin/nvcc)"
        rejected.append(f"nvcc on PATH ({nvcc}) has no toolkit with include/cuda_runtime.h")
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=lambda s: [int(x) for x in re.findall(r"\d+", s)])
    for d in ["/usr/local/cuda"] + versioned[::-1]:
        if _toolkit_ok(Path(d)):
            return str(Path(d)), d
    return None, "; ".join(rejected) or "no CUDA toolkit (nvcc) found: set CUDA_HOME or put nvcc on PATH"


@functools.lru_cache(maxsize=None)
def nvcc_version(cuda_home: str) -> Optional[str]:
    """``"13.0"`` from ``nvcc --version`` (None when it cannot be run)."""
    m = re.search(r"release (\d+\.\d+)", _run(str(Path(cuda_home) / "bin" / "nvcc"), "--version"))
    return m.group(1) if m else None


def cuda_toolkit(torch_cuda: Optional[str]) -> tuple[Optional[str], str]:
    """The toolkit to compile the CUDA sources with for a torch built with CUDA ``torch_cuda``, or
    ``(None, why not)``: no toolkit, or one whose major version differs from torch's (torch refuses it)."""
    if torch_cuda is None:
        return None, "torch is a CPU build"
    home, how = find_cuda_home()
    if home is None:
        return None, how
    ver = nvcc_version(home)
    if ver is None:
        return None, f"{home}/bin/nvcc --version failed"
    if ver.split(".")[0] != torch_cuda.split(".")[0]:
        return None, f"nvcc {ver} at {home} but torch is built with CUDA {torch_cuda} (major versions differ)"
    return home, f"{home} (nvcc {ver}, found via {how})"


def cuda_arch_list(visible_capabilities: list[tuple[int, int]]) -> tuple[str, str]:
    """``(TORCH_CUDA_ARCH_LIST to build with, where it came from)``: the variable, else the visible GPUs'
    architectures (PTX for the newest), else :data:`DEFAULT_CUDA_ARCH_LIST`."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env, "TORCH_CUDA_ARCH_LIST"
    if visible_capabilities:
        caps = sorted(set(visible_capabilities))
        return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX", "the visible GPUs"
    return DEFAULT_CUDA_ARCH_LIST, "default: no GPU visible and TORCH_CUDA_ARCH_LIST unset"


def build_info_source(info: dict) -> str:
    """C++ source defining a string that carries ``info`` (JSON) in the built module."""
    literal = json.dumps(BUILD_INFO_MARKER.decode() + json.dumps(info, sort_keys=True))
    return (
        "// Generated by setup.py: what this module was built from. posenc_kernels/_native.py reads it from\n"
        "// the file without loading the module (a stale module must not register its ops).\n"
        f'extern "C" __attribute__((used, visibility("default"))) const char posenc_build_info[] = {literal};\n'
    )


def read_build_info(library: str) -> Optional[dict]:
    """The dict :func:`build_info_source` embedded in ``library`` (None when it has none)."""
    data = Path(library).read_bytes()
    i = data.find(BUILD_INFO_MARKER)
    if i < 0:
        return None
    j = data.find(b"\0", i)
    try:
        return json.loads(data[i + len(BUILD_INFO_MARKER) : j].decode())
    except ValueError:
        return None


if __name__ == "__main__":  # scripts/check_cuda_compile: `python posenc_kernels/_build.py cuda_kernels`
    import sys

    lists = {"cpu": CPU_SOURCES, "cpu_isa": CPU_ISA_VARIANTS, "cuda_kernels": CUDA_KERNELS, "cuda_glue": CUDA_GLUE}
    print(" ".join(f"csrc/{n}" for n in lists[sys.argv[1]]))
