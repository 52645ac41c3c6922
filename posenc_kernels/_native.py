"""The optional C++/CUDA extension (``csrc/``): locating, building and calling it.

Where the ops come from, first hit wins (lazily, on the first call that needs them - never at import):

1. ``posenc_kernels._C``, built ahead of time against the installed torch::

       POSENC_BUILD_EXT=1 pip install --no-build-isolation .

2. A just-in-time build with ``torch.utils.cpp_extension.load`` from the ``csrc/`` sources (a source
   checkout, or the copy every install ships as ``posenc_kernels/csrc``), cached per torch version / CUDA /
   source hash under
   ``$POSENC_NATIVE_CACHE`` (default ``~/.cache/posenc_kernels``): the first use compiles (about a
   minute on 2 cores), later processes load the cached library.

``POSENC_NATIVE`` selects: ``1``/``auto`` (default) both in that order, ``aot`` the prebuilt module only,
``jit`` the JIT build only, ``0`` neither. CUDA sources (``csrc/*.cu``, ``csrc/cuda_*.cpp``) join the JIT
build only when torch has CUDA and a CUDA toolkit is found (if they fail to build, the CPU kernels are built
alone, with a warning). When nothing loads (no compiler, failed build) one warning line says why and the
Triton/torch paths keep working. A prebuilt module older than a file of the checkout's csrc/ is not loaded.

The public ops are defined in Python (``posenc_kernels/ops``); the extension registers C++ kernels for them
when the op layer asks (``_native_register``, see ``csrc/bindings.cpp``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "has_op", "load", "load_error", "source", "ops_for", "register", "set_value_checks"]

_log = logging.getLogger("posenc_kernels")

_PKG = Path(__file__).resolve().parent
# A source checkout (or editable install) has csrc/ beside the package; an installed copy ships it inside.
CSRC = next((d for d in (_PKG.parent / "csrc", _PKG / "csrc") if (d / "bindings.cpp").is_file()), _PKG.parent / "csrc")
# A family -> the public op whose native kernel stands for it (has_op).
_FAMILY_OPS = {"rope": "rope_", "sinusoidal": "add_sinusoidal_", "learned": "add_position_embedding_"}

_lock = threading.Lock()
_state: dict = {"done": False, "source": None, "error": None}


def _mode() -> str:
    mode = os.environ.get("POSENC_NATIVE", "1").strip().lower()
    aliases = {"": "auto", "1": "auto", "on": "auto", "true": "auto", "off": "0", "false": "0", "no": "0"}
    return aliases.get(mode, mode)


def _cxx_flags() -> list[str]:
    # The flags torch's own generic kernels build with: -O3 and no -march, so the library runs wherever
    # torch runs (at::vec DEFAULT width, vectorised by the compiler). OpenMP for at::parallel_for.
    # -ffp-contract=off: no FMA contraction, so every ISA variant rounds like torch's eager ops (a*c - b*s).
    # The C++ standard is torch's default for its headers.
    return ["-O3", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]


def _cuda_sources() -> list[Path]:
    if not CSRC.is_dir():
        return []
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("cuda_*.cpp"))


def _is_isa_variant(p: Path) -> bool:
    return p.stem.endswith(("_avx2", "_avx512"))


def _cpu_sources() -> list[Path]:
    """Baseline translation units first, the ISA variants (csrc/cpu_variant.h) last: the linker keeps the
    first copy of an inline function two objects share, which must be the baseline build."""
    cpp = [p for p in sorted(CSRC.glob("*.cpp")) if not p.name.startswith("cuda_")]
    return [p for p in cpp if not _is_isa_variant(p)] + [p for p in cpp if _is_isa_variant(p)]


def _want_cuda() -> bool:
    """CUDA sources are built only for a CUDA torch with a toolkit present (nvcc found)."""
    if torch.version.cuda is None or not _cuda_sources():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def _load_aot() -> bool:
    spec = importlib.util.find_spec("posenc_kernels._C")
    if spec is None or not spec.origin:
        return False
    checkout = _PKG.parent / "csrc"
    if checkout.is_dir():  # a checkout: a module older than a source file would run stale code
        built = os.path.getmtime(spec.origin)
        newer = [p.name for p in checkout.rglob("*") if p.is_file() and os.path.getmtime(p) > built]
        if newer:
            raise RuntimeError(f"{Path(spec.origin).name} is older than csrc/{newer[0]} (rebuild it)")
    torch.ops.load_library(spec.origin)
    return True


def _jit_build_dir(sources: list[Path], cuda: bool) -> tuple[str, Path]:
    h = hashlib.sha256()
    h.update(" ".join(p.name for p in sources).encode())  # the link order matters (see _cpu_sources)
    # Every file under csrc/ (sources, headers, compat shims) and the flags: any edit means a new build.
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh", ".hpp"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(" ".join(_cxx_flags()).encode())
    digest = h.hexdigest()[:12]
    tag = f"torch{torch.__version__}-{'cu' + torch.version.cuda if cuda else 'cpu'}".replace("+", "_")
    root = Path(os.environ.get("POSENC_NATIVE_CACHE") or Path.home() / ".cache" / "posenc_kernels")
    return f"posenc_native_{digest}", root / tag / digest


def _load_jit() -> None:
    """Build (or find cached) and load; a failing CUDA build falls back to the CPU kernels alone."""
    if not CSRC.is_dir() or not _cpu_sources():
        raise RuntimeError(f"no C++ sources at {CSRC} (an installed wheel without the prebuilt extension)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    if _want_cuda():
        try:
            return _build_and_load(cuda=True)
        except Exception as e:
            warnings.warn_explicit(
                f"native CUDA kernels failed to build ({_one_line(e)}); building the CPU kernels alone",
                RuntimeWarning,
                filename="posenc_kernels",
                lineno=0,
                module=__name__,
            )
    _build_and_load(cuda=False)


def _build_and_load(cuda: bool) -> None:
    from torch.utils import cpp_extension

    cpu = _cpu_sources()  # the ISA variants stay last, after the CUDA objects too
    base = [p for p in cpu if not _is_isa_variant(p)]
    sources = base + (_cuda_sources() if cuda else []) + [p for p in cpu if _is_isa_variant(p)]
    name, build_dir = _jit_build_dir(sources, cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").exists():
        _log.warning("posenc_kernels: building the native extension once into %s (about a minute)", build_dir)
    kwargs = dict(
        name=name,
        sources=[str(p) for p in sources],
        extra_cflags=_cxx_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("POSENC_NATIVE_VERBOSE", "0") == "1",
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3"]
    cpp_extension.load(**kwargs)


def load() -> bool:
    """Load the extension once (thread-safe); True when its ops are registered. Never raises."""
    if _state["done"]:
        return _state["source"] is not None
    with _lock:
        if _state["done"]:
            return _state["source"] is not None
        mode = _mode()
        errors = []
        if mode not in ("auto", "aot", "jit", "0"):
            errors.append(f"POSENC_NATIVE={os.environ.get('POSENC_NATIVE')!r} is not one of 0, 1, aot, jit")
        elif mode == "0":
            errors.append("disabled by POSENC_NATIVE=0")
        if not errors and mode in ("auto", "aot"):
            try:
                if _load_aot():
                    _state["source"] = "aot"
                elif mode == "aot":
                    errors.append("POSENC_NATIVE=aot but posenc_kernels._C was not built")
            except Exception as e:  # a stale build against another torch: undefined symbols
                errors.append(f"posenc_kernels._C failed to load: {_one_line(e)}")
        if _state["source"] is None and mode in ("auto", "jit"):
            try:
                _load_jit()
                _state["source"] = "jit"
                if errors:  # e.g. a prebuilt module older than the sources: say why it was passed over
                    _log.warning("posenc_kernels: using the JIT-built extension (%s)", "; ".join(errors))
            except Exception as e:
                errors.append(f"JIT build failed: {_one_line(e)}")
        if _state["source"] is None:
            _state["error"] = "; ".join(errors) or "unknown reason"
            if mode != "0":
                # One line (no source line echoed), filterable by module "posenc_kernels._native".
                warnings.warn_explicit(
                    f"native extension unavailable ({_state['error']}); using the Triton/torch backends",
                    RuntimeWarning,
                    filename="posenc_kernels",
                    lineno=0,
                    module=__name__,
                )
        _state["done"] = True
        return _state["source"] is not None


def _one_line(e: Exception) -> str:
    """The first compiler diagnostic of a failed build (else the first line of the message)."""
    text = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = next((ln for ln in text if "error:" in ln), None) or next(
        (ln for ln in text if "error" in ln.lower()), text[0] if text else ""
    )
    return f"{type(e).__name__}: {first[:300]}"


def available() -> bool:
    """True when the extension is (or can be) loaded; triggers the load (maybe a JIT build)."""
    return load()


def source() -> Optional[str]:
    """``"aot"`` or ``"jit"``: where the loaded extension came from (None when not loaded)."""
    return _state["source"] if _state["done"] else None


def load_error() -> Optional[str]:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    return _state["error"]


def has_op(name: str, device_type: str) -> bool:
    """True when the extension has a ``device_type`` kernel for family ``name`` (``"rope"``,
    ``"sinusoidal"``, ``"learned"``) or public op ``name`` (``"rope_"``, ...). Loads it on first use."""
    op = _FAMILY_OPS.get(name, name)
    return device_type in ("cpu", "cuda") and op in ops_for(device_type.upper())


# ----------------------------------------------------------------------------------------------
# What the op layer (posenc_kernels/ops/registry.py) asks of the extension
# ----------------------------------------------------------------------------------------------
_ops_for: dict = {}


def ops_for(key: str) -> frozenset:
    """The public ops whose kernels the loaded extension can register for dispatch key ``key`` ("CPU",
    "CUDA"); empty without the extension. Cached: the registry asks on every Python-kernel call."""
    hit = _ops_for.get(key)
    if hit is None:
        hit = frozenset()
        if load() and hasattr(torch.ops.posenc, "_native_ops"):
            hit = frozenset(torch.ops.posenc._native_ops(key))
        _ops_for[key] = hit
    return hit


def register(key: str, enable: bool) -> list:
    """Register (or remove) the extension's kernels for ``key`` ("CPU", "CUDA", "ADInplaceOrView") on the
    public ops; returns the op names concerned (empty without the extension)."""
    if _state["source"] is None or not hasattr(torch.ops.posenc, "_native_register"):
        return []
    return list(torch.ops.posenc._native_register(key, enable))


def set_value_checks(enabled: bool) -> None:
    """Mirror :func:`posenc_kernels.set_value_checks` into the extension's kernels."""
    if _state["source"] is not None and hasattr(torch.ops.posenc, "_native_value_checks"):
        torch.ops.posenc._native_value_checks(enabled)
