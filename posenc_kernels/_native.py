"""The optional C++/CUDA extension (``csrc/``): locating, building and loading it, and the controls the op
layer sets in it (``docs/install.md`` tells the whole story). First hit wins, once:

1. ``posenc_kernels._C``, built ahead of time (``setup.py``); passed over when built against another torch
   or from other sources than a checkout's ``csrc/``;
2. a just-in-time build cached under ``$POSENC_NATIVE_CACHE`` (default ``~/.cache/posenc_kernels``), keyed
   by everything that decides the build; a failure is remembered (``POSENC_NATIVE_RETRY=1`` retries).

``POSENC_NATIVE``: ``1``/``auto`` (default) both in that order, ``aot``, ``jit``, ``0`` neither. When
nothing loads, one warning says why and the Triton/torch backends work. The library registers a C++
chooser per public op (``csrc/native_ops.h``) that runs its kernel or redispatches to Python's, from the
selection set here (:func:`set_backend`, ...; codes are indices into ``registry.BACKENDS``).
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
    "available", "has_op", "load", "load_error", "source", "ops_for", "set_value_checks", "set_backend",
    "set_thread_backend", "set_triton", "kernel_devices", "status", "cpu_isa",
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
    # torch's generic-kernel flags (no -march: runs wherever torch runs); no FMA contraction, so every ISA
    # variant rounds like torch's eager ops.
    return ["-O3", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]


@functools.lru_cache(maxsize=None)
def _cuda_toolkit() -> tuple[Optional[str], str]:
    """The CUDA toolkit the JIT build compiles with, or ``(None, why the CUDA sources are not built)``."""
    if not all(p.is_file() for p in _build.extension_sources(CSRC, cuda=True)):
        return None, f"no CUDA sources in {CSRC}"
    if os.environ.get("POSENC_BUILD_CUDA", "1") == "0":
        return None, "POSENC_BUILD_CUDA=0"
    return _build.cuda_toolkit(torch.version.cuda)


def _cuda_arch_list() -> tuple[str, str]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return _build.cuda_arch_list([torch.cuda.get_device_capability(i) for i in range(n)])


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
    """``(library name, build folder)``, keyed by the torch version and a hash of everything that decides the
    build (sources in link order, flags, compiler, CUDA toolkit and architectures), never paths or times."""
    h = hashlib.sha256()
    h.update(" ".join(p.name for p in sources).encode())  # the link order matters (see _build.CPU_SOURCES)
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


def _warn(message: str) -> None:
    """One warning line (no source line echoed), filterable by module ``posenc_kernels._native``."""
    warnings.warn_explicit(message, RuntimeWarning, filename="posenc_kernels", lineno=0, module=__name__)


def _load_jit() -> None:
    """Build (or find cached) and load; a failing CUDA build falls back to the CPU kernels alone."""
    if not all(p.is_file() for p in _build.extension_sources(CSRC, cuda=False)):
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
                _warn(f"native CUDA kernels unavailable ({_one_line(e)}); using the CPU kernels alone")
    _build_and_load(cuda=False)


@contextlib.contextmanager
def _cuda_build_env():
    """During a CUDA build: the toolkit :func:`_cuda_toolkit` found (torch's own CUDA_HOME guess may be a
    folder without headers) and an explicit TORCH_CUDA_ARCH_LIST (torch's detection fails without a GPU)."""
    from torch.utils import cpp_extension

    saved_home, saved_archs = cpp_extension.CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST")
    cpp_extension.CUDA_HOME, os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_toolkit()[0], _cuda_arch_list()[0]
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

    sources = _build.extension_sources(CSRC, cuda)  # in link order
    name, build_dir = _jit_build_dir(sources, cuda)
    library, failed = build_dir / f"{name}.so", build_dir / _FAILED
    if failed.is_file() and os.environ.get("POSENC_NATIVE_RETRY", "0") != "1":
        try:
            why = json.loads(failed.read_text()).get("error", "?")
        except ValueError:
            why = "?"
        raise RuntimeError(
            f"an earlier build of these sources failed ({why}); not compiling again (remembered in {failed}; "
            "POSENC_NATIVE_RETRY=1 or python -m posenc_kernels --rebuild tries again)"
        )
    # A finished build of exactly these inputs (BUILT is written last): load it without ninja, which would
    # recompile every source with a newer timestamp, e.g. after a reinstall.
    if library.is_file() and (build_dir / _BUILT).is_file():
        torch.ops.load_library(str(library))
        _state["library"] = str(library)
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    what = f"CPU and CUDA ({_cuda_arch_list()[0]})" if cuda else "CPU"
    _progress(f"posenc_kernels: building the native {what} kernels once ({len(sources)} sources) into "
              f"{build_dir}: about 1 min on 2 cores; later imports load the cached build")
    t0 = time.monotonic()
    try:
        with _cuda_build_env() if cuda else contextlib.nullcontext():
            cpp_extension.load(
                name=name, sources=[str(p) for p in sources], extra_cflags=_cxx_flags(), extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=["-O3"] if cuda else None, build_directory=str(build_dir), is_python_module=False,
                verbose=os.environ.get("POSENC_NATIVE_VERBOSE", "0") == "1",
            )  # fmt: skip
    except Exception as e:
        record = {"error": _one_line(e), "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with contextlib.suppress(OSError):
            failed.write_text(json.dumps(record) + "\n")
        raise
    failed.unlink(missing_ok=True)
    seconds = round(time.monotonic() - t0, 1)
    (build_dir / _BUILT).write_text(json.dumps({"torch": torch.__version__, "seconds": seconds}))
    _progress(f"posenc_kernels: native {what} kernels built in {seconds} s")
    _state["library"] = str(library)


def _progress(line: str) -> None:
    """Write ``line`` to fd 2 directly (pytest's ``--capture=fd`` replaces sys.stderr) and, when fd 2 is not a
    terminal but the process has one (pytest redirects fd 2), to that terminal."""
    data = (line + "\n").encode()
    with contextlib.suppress(OSError):
        os.write(2, data)
    with contextlib.suppress(OSError):
        if not os.isatty(2):
            fd = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


def forget_builds() -> list[Path]:
    """Remove this environment's JIT build folders (CPU and CUDA, failed or not) for the current sources;
    returns the folders removed. The next :func:`load` in a new process builds afresh."""
    removed, cuda_too = [], torch.version.cuda is not None and _cuda_toolkit()[0] is not None
    for cuda in (False, True) if cuda_too else (False,):
        _, d = _jit_build_dir(_build.extension_sources(CSRC, cuda), cuda)
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
                _warn(f"native extension unavailable ({_state['error']}); using the Triton/torch backends")
        _state["done"] = True
        return _state["source"] is not None


def _one_line(e: Exception) -> str:
    """The first compiler diagnostic of a failed build (else the first line of the message)."""
    text = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = next((ln for ln in text if "error:" in ln), None)
    first = first or next((ln for ln in text if "error" in ln.lower()), text[0] if text else "")
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


def kernel_devices() -> dict[str, list[str]]:
    """``{"posenc::op": device types it has a C++ kernel for}`` (loads the extension; empty without it)."""
    ops = sorted(ops_for("CPU") | ops_for("CUDA"))
    return {f"posenc::{op}": [dev for dev in ("cpu", "cuda") if op in ops_for(dev.upper())] for op in ops}


def status() -> dict:
    """Where the extension stands in this process (loads it, maybe building it): what ``python -m
    posenc_kernels`` prints."""
    loaded = load()
    home, toolkit = _cuda_toolkit() if torch.version.cuda is not None else (None, "torch is a CPU build")
    return {
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
        "aot_build_info": _build.read_build_info(_state["library"]) if _state["source"] == "aot" else None,
        "cpu_isa": cpu_isa() if loaded else {},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def cpu_isa() -> dict[str, str]:
    """``{"rope": ..., "sinusoidal": ...}``: the instruction set (``AVX512``, ``AVX2``, ``baseline``) of the
    CPU kernel variant each family runs in this process: the widest ``at::get_cpu_capability()`` allows
    (``ATEN_CPU_CAPABILITY`` narrows it) that this build compiled. Empty without the extension, or for a
    build that predates the query. The learned op has one baseline build (no variants)."""
    if not load() or not hasattr(torch.ops.posenc, "_native_cpu_isa"):
        return {}
    return dict(item.split("=", 1) for item in torch.ops.posenc._native_cpu_isa())


# What the op layer (posenc_kernels/ops/registry.py) asks of the extension.
_ops_for: dict = {}


def ops_for(key: str) -> frozenset:
    """The public ops the loaded extension registered for dispatch key ``key`` (``"CPU"``, ``"CUDA"``,
    ``"BackendSelect"``, ``"ADInplaceOrView"``); empty without it. Cached: asked on every Python-kernel call."""
    hit = _ops_for.get(key)
    if hit is None:
        hit = frozenset()
        if load() and hasattr(torch.ops.posenc, "_native_ops"):
            hit = frozenset(torch.ops.posenc._native_ops(key))
        _ops_for[key] = hit
    return hit


def set_value_checks(enabled: bool) -> None:
    """Mirror :func:`posenc_kernels.set_value_checks` into the extension's kernels."""
    if _state["source"] is not None and hasattr(torch.ops.posenc, "_native_value_checks"):
        torch.ops.posenc._native_value_checks(enabled)


def _loaded() -> bool:
    return _state["source"] is not None and hasattr(torch.ops.posenc, "_native_set_backend")


def set_backend(code: int) -> None:
    """The process-wide backend of the extension's choosers (an index into ``registry.BACKENDS``): ``auto``
    runs the C++ kernel where Triton is not preferred (:func:`set_triton`), ``native`` wherever the op has
    one, ``triton``/``torch`` never. A no-op without the extension."""
    if _loaded():
        torch.ops.posenc._native_set_backend(int(code))


def set_thread_backend(code: int) -> None:
    """This thread's override of :func:`set_backend` (same codes), or ``-1`` to clear it (the caller restores
    the previous value). A no-op without the extension."""
    if _loaded():
        torch.ops.posenc._native_set_thread_backend(int(code))


def set_triton(cpu: bool, cuda: bool) -> None:
    """Whether ``auto`` prefers Triton on CPU tensors (``TRITON_INTERPRET=1``) and on CUDA tensors (Triton
    importable); the op layer calls it once at import. A no-op without the extension."""
    if _loaded():
        torch.ops.posenc._native_set_triton(bool(cpu), bool(cuda))
