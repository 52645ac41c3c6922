"""The optional C++/CUDA extension (``csrc/``): locating, building and calling it.

Where the kernels come from, first hit wins (once, when the package is imported: the op layer registers the
C++ kernels with the dispatcher then, see ``posenc_kernels/ops/registry.py`` ``finalize``):

1. ``posenc_kernels._C``, built ahead of time against the installed torch::

       POSENC_BUILD_EXT=1 pip install --no-build-isolation .

2. A just-in-time build with ``torch.utils.cpp_extension.load`` from the ``csrc/`` sources (a source
   checkout, or the copy every install ships as ``posenc_kernels/csrc``), cached under
   ``$POSENC_NATIVE_CACHE`` (default ``~/.cache/posenc_kernels``) in ``<torch version>-<cpu|cuXX>/<key>``,
   the key hashing the sources' names and contents, the flags and the CUDA toolkit/architectures - never
   timestamps, so reinstalling the package reuses the build. The first use compiles (about a minute on
   2 cores); later processes load the cached library without running the compiler.

``POSENC_NATIVE`` selects: ``1``/``auto`` (default) both in that order, ``aot`` the prebuilt module only,
``jit`` the JIT build only, ``0`` neither. CUDA sources (``csrc/*.cu``, ``csrc/cuda_*.cpp``) join the JIT
build only when torch has CUDA and a CUDA toolkit of torch's major version is found
(:func:`posenc_kernels._build.cuda_toolkit`); without a visible GPU and without ``TORCH_CUDA_ARCH_LIST`` they
are built for :data:`posenc_kernels._build.DEFAULT_CUDA_ARCH_LIST`. If they fail to build, the CPU kernels
are built alone, with a warning. A failed build is remembered in its cache folder (``BUILD_FAILED``), so
later processes do not compile it again: ``POSENC_NATIVE_RETRY=1`` retries it, ``python -m posenc_kernels
--rebuild`` rebuilds from scratch. When nothing loads (no compiler, failed build) one warning line says why
and the Triton/torch backends keep working. A prebuilt module is not loaded when it was built from other
sources than a checkout's ``csrc/`` or against another torch (it carries both, see ``setup.py``).
``python -m posenc_kernels`` prints all of this for the running environment.

The public ops are defined in Python (``posenc_kernels/ops``); the extension registers C++ kernels for them
when the op layer asks (``_native_register``, see ``csrc/bindings.cpp``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import _build

__all__ = [
    "available", "has_op", "load", "load_error", "source", "ops_for", "register", "set_value_checks",
    "registered_ops", "kernel_devices", "status",
]  # fmt: skip

_log = logging.getLogger("posenc_kernels")

_PKG = Path(__file__).resolve().parent
# A source checkout (or editable install) has csrc/ beside the package; an installed copy ships it inside.
CSRC = next((d for d in (_PKG.parent / "csrc", _PKG / "csrc") if (d / "bindings.cpp").is_file()), _PKG.parent / "csrc")
# A family -> the public op whose native kernel stands for it (has_op).
_FAMILY_OPS = {"rope": "rope_", "sinusoidal": "add_sinusoidal_", "learned": "add_position_embedding_"}

_lock = threading.Lock()
_state: dict = {"done": False, "source": None, "error": None, "library": None, "cuda_skipped": None}


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


@functools.lru_cache(maxsize=None)
def _cuda_toolkit() -> tuple[Optional[str], str]:
    """The CUDA toolkit the JIT build compiles with, or ``(None, why the CUDA sources are not built)``."""
    if not _cuda_sources():
        return None, f"no CUDA sources in {CSRC}"
    if os.environ.get("POSENC_BUILD_CUDA", "1") == "0":
        return None, "POSENC_BUILD_CUDA=0"
    return _build.cuda_toolkit(torch.version.cuda)


def _want_cuda() -> bool:
    """CUDA sources are built only for a CUDA torch with a toolkit (nvcc and headers) of its CUDA version."""
    return torch.version.cuda is not None and _cuda_toolkit()[0] is not None


def _visible_capabilities() -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _cuda_arch_list() -> tuple[str, str]:
    return _build.cuda_arch_list(_visible_capabilities())


def _checkout_csrc() -> Optional[Path]:
    d = _PKG.parent / "csrc"
    return d if (d / "bindings.cpp").is_file() else None


def _aot_stale_reason(library: str) -> Optional[str]:
    """Why the prebuilt module must not be loaded (None when it may): built against another torch, or - in a
    checkout - from other sources than its csrc/ (compared by content hash, not timestamps)."""
    info = _build.read_build_info(library)
    if info is None:
        return f"{Path(library).name} carries no build info (built by an older setup.py: rebuild it)"
    if info.get("torch") != torch.__version__:
        return f"{Path(library).name} was built against torch {info.get('torch')}, this is torch {torch.__version__}"
    checkout = _checkout_csrc()
    if checkout is not None and info.get("source") != _build.source_hash(checkout):
        return f"{Path(library).name} was built from other sources than {checkout} (rebuild it)"
    return None


def _load_aot() -> bool:
    spec = importlib.util.find_spec("posenc_kernels._C")
    if spec is None or not spec.origin:
        return False
    stale = _aot_stale_reason(spec.origin)
    if stale:
        raise RuntimeError(stale)
    torch.ops.load_library(spec.origin)
    _state["library"] = spec.origin
    return True


def _cache_root() -> Path:
    return Path(os.environ.get("POSENC_NATIVE_CACHE") or Path.home() / ".cache" / "posenc_kernels")


def _jit_build_dir(sources: list[Path], cuda: bool) -> tuple[str, Path]:
    """``(library name, build folder)``: the folder is keyed by the torch version and a hash of everything
    that decides the build - sources (names, contents, link order), flags, compiler, CUDA toolkit and
    architectures - and of nothing else (no paths, no timestamps)."""
    h = hashlib.sha256()
    h.update(" ".join(p.name for p in sources).encode())  # the link order matters (see _cpu_sources)
    h.update(_build.source_hash(CSRC).encode())  # every source and header csrc/ ships
    h.update(" ".join(_cxx_flags()).encode())
    h.update(os.environ.get("CXX", "c++").encode())
    if cuda:
        home, _ = _cuda_toolkit()
        h.update(f"{home} {_build.nvcc_version(home) if home else None} {_cuda_arch_list()[0]}".encode())
    digest = h.hexdigest()[:12]
    tag = f"torch{torch.__version__}-{'cu' + torch.version.cuda if cuda else 'cpu'}".replace("+", "_")
    return f"posenc_native_{digest}", _cache_root() / tag / digest


_FAILED, _BUILT = "BUILD_FAILED", "BUILT"


def _retry() -> bool:
    return os.environ.get("POSENC_NATIVE_RETRY", "0") == "1"


def _load_jit() -> None:
    """Build (or find cached) and load; a failing CUDA build falls back to the CPU kernels alone."""
    if not CSRC.is_dir() or not _cpu_sources():
        raise RuntimeError(f"no C++ sources at {CSRC} (an installed wheel without the prebuilt extension)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    if torch.version.cuda is not None:
        home, why = _cuda_toolkit()
        if home is None:
            _state["cuda_skipped"] = why
        else:
            try:
                return _build_and_load(cuda=True)
            except Exception as e:
                _state["cuda_skipped"] = f"the CUDA build failed: {_one_line(e)}"
                warnings.warn_explicit(
                    f"native CUDA kernels unavailable ({_one_line(e)}); using the CPU kernels alone",
                    RuntimeWarning,
                    filename="posenc_kernels",
                    lineno=0,
                    module=__name__,
                )
    _build_and_load(cuda=False)


@contextlib.contextmanager
def _cuda_build_env():
    """During a CUDA build: the toolkit :func:`_cuda_toolkit` found (torch's own CUDA_HOME guess may be a
    folder without headers) and an explicit TORCH_CUDA_ARCH_LIST (torch's detection fails without a GPU)."""
    from torch.utils import cpp_extension

    home, _ = _cuda_toolkit()
    saved_home, saved_archs = cpp_extension.CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST")
    cpp_extension.CUDA_HOME = home
    os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()[0]
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        if saved_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_archs


def _build_and_load(cuda: bool) -> None:
    from torch.utils import cpp_extension

    cpu = _cpu_sources()  # the ISA variants stay last, after the CUDA objects too
    base = [p for p in cpu if not _is_isa_variant(p)]
    sources = base + (_cuda_sources() if cuda else []) + [p for p in cpu if _is_isa_variant(p)]
    name, build_dir = _jit_build_dir(sources, cuda)
    library, failed = build_dir / f"{name}.so", build_dir / _FAILED
    if failed.is_file() and not _retry():
        try:
            why = json.loads(failed.read_text()).get("error", "?")
        except ValueError:
            why = "?"
        raise RuntimeError(
            f"an earlier build of these sources failed ({why}); not compiling again (remembered in {failed}; "
            "POSENC_NATIVE_RETRY=1 or python -m posenc_kernels --rebuild tries again)"
        )
    # A finished build of exactly these inputs (the folder is keyed by them; BUILT is written once the library
    # is complete): load it without running ninja, which would recompile every source whose timestamp is
    # newer, e.g. after a reinstall.
    if library.is_file() and (build_dir / _BUILT).is_file():
        torch.ops.load_library(str(library))
        _state["library"] = str(library)
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    what = f"CPU and CUDA ({_cuda_arch_list()[0]})" if cuda else "CPU"
    _log.warning("posenc_kernels: building the native %s kernels once into %s (about a minute)", what, build_dir)
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
    t0 = time.monotonic()
    try:
        with _cuda_build_env() if cuda else contextlib.nullcontext():
            cpp_extension.load(**kwargs)
    except Exception as e:
        record = {"error": _one_line(e), "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with contextlib.suppress(OSError):
            failed.write_text(json.dumps(record) + "\n")
        raise
    failed.unlink(missing_ok=True)
    (build_dir / _BUILT).write_text(json.dumps({"torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1)}))
    _state["library"] = str(library)


def forget_builds() -> list[Path]:
    """Remove this environment's JIT build folders (CPU and CUDA, failed or not) for the current sources;
    returns the folders removed. The next :func:`load` in a new process builds afresh."""
    removed = []
    cpu = _cpu_sources()
    base = [p for p in cpu if not _is_isa_variant(p)]
    variants = [p for p in cpu if _is_isa_variant(p)]
    for cuda in (False, True) if _want_cuda() else (False,):
        _, d = _jit_build_dir(base + (_cuda_sources() if cuda else []) + variants, cuda)
        if d.is_dir():
            shutil.rmtree(d)
            removed.append(d)
    return removed


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


def registered_ops() -> list[str]:
    """The qualified names (``posenc::...``) of the public ops the loaded extension has kernels for, on any
    device (it says so itself: ``_native_ops``); empty without it."""
    return sorted(f"posenc::{op}" for op in ops_for("CPU") | ops_for("CUDA"))


def kernel_devices() -> dict[str, list[str]]:
    """For each of :func:`registered_ops`, the device types the extension has a kernel for (loads it). Which
    kernel serves a key right now is the op layer's choice: ``posenc_kernels.ops.registry.registered_kernels``."""
    return {op: [dev for dev in ("cpu", "cuda") if op.split("::")[1] in ops_for(dev.upper())] for op in registered_ops()}


def status() -> dict:
    """Where the extension stands in this process (loads it, maybe building it): source, library, kernels per
    op and device, cache folder, CUDA toolkit and architectures, and why something was skipped or failed."""
    loaded = load()
    home, toolkit = _cuda_toolkit() if torch.version.cuda is not None else (None, "torch is a CPU build")
    info = {
        "mode": _mode(),
        "source": source(),
        "library": _state["library"],
        "error": load_error(),
        "kernels": kernel_devices() if loaded else {},
        "cache": str(_cache_root()),
        "csrc": str(CSRC),
        "cuda_toolkit": home,
        "cuda_toolkit_note": toolkit,
        "cuda_skipped": _state["cuda_skipped"],
        "cuda_archs": _cuda_arch_list() if home is not None else None,
        "aot_build_info": None,
    }
    if _state["source"] == "aot":
        info["aot_build_info"] = _build.read_build_info(_state["library"])
    return info


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


def _control(name: str, *args) -> None:
    """Call the extension's control op ``posenc::<name>`` when it is loaded (no-op without it)."""
    if _state["source"] is not None and hasattr(torch.ops.posenc, name):
        getattr(torch.ops.posenc, name)(*args)


def set_backend(code: int) -> None:
    """The process-wide backend (its index in ``registry.BACKENDS``) the extension's choosers read."""
    _control("_native_set_backend", code)


def set_thread_backend(code: int) -> None:
    """This thread's override of :func:`set_backend` (-1: none)."""
    _control("_native_set_thread_backend", code)


def set_triton(cpu: bool, cuda: bool) -> None:
    """Whether backend ``auto`` prefers the Triton kernels on CPU / CUDA tensors (set once, at import)."""
    _control("_native_set_triton", cpu, cuda)


def set_value_checks(enabled: bool) -> None:
    """Mirror :func:`posenc_kernels.set_value_checks` into the extension's kernels."""
    if _state["source"] is not None and hasattr(torch.ops.posenc, "_native_value_checks"):
        torch.ops.posenc._native_value_checks(enabled)
