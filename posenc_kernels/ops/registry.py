"""The op layer: one schema per op, one implementation per dispatch key, the backend read in one place.

Every public op is defined here once, by its schema string (:func:`define`), in the ``posenc`` namespace.
Its implementations are registered with the dispatcher, never picked by the code above it:

* **Meta / fake**: the op's check plus its output shapes (:class:`OpSpec` ``check`` and ``fake``).
* **CPU** and **CUDA**: the C++ kernels of the native extension (``csrc/``), registered straight for the
  key when the extension is loaded and is the backend in force, so an eager call costs what a bare C++ op
  costs; otherwise a Python kernel that runs the op's check and then the Triton launcher or the pure-torch
  implementation. On CUDA the default is Triton; on CPU the native kernel (the pure-torch one without the
  extension, Triton's interpreter with ``TRITON_INTERPRET=1``).
* **ADInplaceOrView** (mutating ops): bumps the version counters of what the op writes - the extension's
  C++ fallback when loaded, else a Python kernel.
* **Autograd**: registered once per functional op (``register_autograd``); the in-place ops get theirs from
  the autograd.Function of their public function (PyTorch cannot register a formula for a mutating op).

The backend override - :func:`set_backend` (process default, ``POSENC_BACKEND``) and :func:`use_backend`
(thread-local context) - is read by :func:`backend_for` alone. While a thread-local override is active a
Python kernel on ``BackendSelect`` routes each call to the backend its thread asked for (native calls
continue below it to the C++ kernel); without one that kernel is absent and costs nothing. It also runs
while the CUDA C++ kernels serve the CUDA key (``set_backend("native")`` on a CUDA build): they read no
tensor values (no host sync), so the op's check, value checks included, runs there first.

Factory ops (``define(..., factory=True)``: ``sinusoidal_table``, whose only tensor argument is optional)
give the dispatcher no tensor to pick a key from. They get a permanent Python ``BackendSelect`` kernel that
picks the backend from their ``device`` argument, as ATen's factory functions do: it runs the Python
implementation itself, or redispatches to the CPU/CUDA key for the C++ kernel (Meta for meta devices).
It reads the override through :func:`backend_for` on every call, so it is also that op's router: the
override's router is never installed for a factory op.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch._C import DispatchKey

from .. import _native

try:  # Triton is optional on CPU-only machines: the torch backend needs nothing else.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "native", "torch")
NAMESPACE = "posenc"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_KEYS = ("CPU", "CUDA")


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set before import: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_INTERPRET = interpreter_enabled()


@dataclass
class OpSpec:
    """One op: its schema and what implements it. ``check(*args, values=...)`` validates every argument
    (``values=False`` for fakes: no storage, no values); ``fake(*args)`` returns outputs of the right
    shape; ``impls`` maps ``"triton"`` / ``"torch"`` to Python implementations taking the schema's
    arguments; ``native`` says the extension may implement it (see ``csrc/bindings.cpp``)."""

    name: str
    schema: str
    check: Callable
    fake: Callable
    impls: dict
    native: bool = False
    mutated: tuple = ()  # argument indices the op writes
    device_arg: int = 0  # the argument whose device picks the kernel
    factory: bool = False  # picks its key from a Device argument on BackendSelect (see the module docstring)
    overload: Optional[torch._ops.OpOverload] = None
    kernels: dict = field(default_factory=dict)  # key -> the Python kernel registered for it


_OPS: dict[str, OpSpec] = {}
_state = {"default": os.environ.get("POSENC_BACKEND", "auto"), "overrides": 0, "ready": False}
if _state["default"] not in BACKENDS:
    raise ValueError(f"POSENC_BACKEND must be one of {BACKENDS}, got {_state['default']!r}")
_tls = threading.local()
_lock = threading.RLock()
_libs: dict = {}  # (key, "py") -> Library with the Python kernels of native-capable ops; "chooser"; "view"
_native_on: dict = {}  # key -> the op names whose C++ kernels are registered for it


# ----------------------------------------------------------------------------------------------
# The backend, read in one place
# ----------------------------------------------------------------------------------------------


def _tls_stack() -> list:
    stack = getattr(_tls, "stack", None)
    if stack is None:
        stack = _tls.stack = []
    return stack


def get_backend() -> str:
    """The backend in force in this thread: the innermost :func:`use_backend`, else :func:`set_backend`'s."""
    stack = _tls_stack()
    return stack[-1] if stack else _state["default"]


def _native_keys(spec: OpSpec, device_type: str) -> bool:
    return spec.native and spec.name in _native.ops_for(device_type.upper())


def backend_for(spec: OpSpec, device_type: str, name: Optional[str] = None) -> str:
    """Which implementation runs ``spec`` for tensors on ``device_type`` under backend ``name`` (default:
    the one in force): ``"triton"``, ``"native"`` or ``"torch"``. The only reader of the override."""
    name = get_backend() if name is None else name
    triton_ok = HAS_TRITON and "triton" in spec.impls and (device_type == "cuda" or (device_type == "cpu" and _INTERPRET))
    if name == "torch":
        return "torch"
    if name == "triton":
        if not triton_ok:
            raise RuntimeError(
                f"backend 'triton' was forced but cannot run on {device_type} tensors: Triton kernels need a "
                "CUDA device, or TRITON_INTERPRET=1 set before importing posenc_kernels for CPU tensors"
            )
        return "triton"
    if name == "native" and spec.native:  # ops without a native kernel run as under auto
        if _native_keys(spec, device_type):
            return "native"
        why = _native.load_error() or f"the extension has no {device_type} kernel for {spec.name!r}"
        raise RuntimeError(
            f"backend 'native' was forced but cannot run on {device_type} tensors: {why}. Build it with "
            "POSENC_BUILD_EXT=1 pip install --no-build-isolation . or let it build on first import (needs a C++ "
            "compiler, and nvcc for the CUDA kernels)"
        )
    if triton_ok:
        return "triton"
    if _native_keys(spec, device_type):
        return "native"
    return "torch"


def set_backend(name: str) -> None:
    """Force an implementation for every op, process-wide: ``"auto"`` (default), ``"triton"``,
    ``"native"`` or ``"torch"``.

    ``auto`` runs the Triton kernels on CUDA tensors (and on CPU tensors when the Triton interpreter is on,
    ``TRITON_INTERPRET=1`` before import); on CPU otherwise the op's C++ kernel when the native extension is
    loaded, else the pure-torch implementation. ``native`` forces the extension for the ops that have a
    native kernel (an error where it is unavailable; ops without one run as under ``auto``).
    ``POSENC_BACKEND`` sets the initial value; :func:`use_backend` overrides it in one thread.

    >>> import posenc_kernels as pk
    >>> pk.set_backend("torch"); pk.get_backend()
    'torch'
    >>> pk.set_backend("auto")
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    with _lock:
        _state["default"] = name
        _sync()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops with backend ``name`` inside the block, in this thread only (see :func:`set_backend`).

    >>> import torch, posenc_kernels as pk
    >>> with pk.use_backend("torch"):
    ...     pe = pk.sinusoidal_table(4, 8)
    >>> pe.shape
    torch.Size([4, 8])
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    stack = _tls_stack()
    with _lock:
        stack.append(name)
        if len(stack) == 1:
            _state["overrides"] += 1
            _sync()
    try:
        yield
    finally:
        with _lock:
            stack.pop()
            if not stack:
                _state["overrides"] -= 1
                _sync()


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def _device_type(spec: OpSpec, args) -> str:
    t = args[spec.device_arg]
    if isinstance(t, torch.Tensor):
        return t.device.type
    for a in args:  # ops whose first argument may be None (sinusoidal_table): the first tensor, or device
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, torch.device):
            return a.type
    return "cpu"


def run_python(spec: OpSpec, backend: str, args):
    """The op's check, then its Python implementation for ``backend``."""
    spec.check(*args, values=True)
    return spec.impls[backend](*args)


def _python_kernel(spec: OpSpec):
    def kernel(*args):
        backend = backend_for(spec, _device_type(spec, args))
        if backend == "native":  # only while a registration change is in flight in another thread
            return spec.overload(*args)
        return run_python(spec, backend, args)

    kernel.__name__ = f"posenc_{spec.name}_python"
    return kernel


def _chooser_kernel(spec: OpSpec):
    below = torch._C.DispatchKeySet(DispatchKey.BackendSelect)

    def kernel(keyset, *args):
        device_type = _device_type(spec, args)
        if device_type not in ("cpu", "cuda"):
            return spec.overload.redispatch(keyset - below, *args)  # meta tensors: the fake
        backend = backend_for(spec, device_type)
        if backend != "native":
            return run_python(spec, backend, args)
        if device_type == "cuda":  # the CUDA C++ kernels read no values (no sync): the check runs here
            spec.check(*args, values=True)
        return spec.overload.redispatch(keyset - below, *args)

    kernel.__name__ = f"posenc_{spec.name}_chooser"
    return kernel


def _factory_kernel(spec: OpSpec):
    """The permanent BackendSelect kernel of a factory op: the backend of its ``device`` argument."""
    device_arg = next(i for i, a in enumerate(spec.overload._schema.arguments) if a.type.kind() == "DeviceObjType")
    keys = {"cpu": DispatchKey.CPU, "cuda": DispatchKey.CUDA, "meta": DispatchKey.Meta}

    def kernel(keyset, *args):
        device_type = torch.device(args[device_arg]).type
        if device_type in ("cpu", "cuda"):
            backend = backend_for(spec, device_type)
            if backend != "native":
                return run_python(spec, backend, args)
        elif device_type not in keys:
            raise RuntimeError(f"posenc::{spec.name} has no kernel for device {device_type!r}")
        return spec.overload.redispatch(torch._C.DispatchKeySet(keys[device_type]), *args)  # C++ or Meta

    kernel.__name__ = f"posenc_{spec.name}_factory"
    return kernel


def _inplace_view_kernel(spec: OpSpec):
    """ADInplaceOrView without the extension: what the dispatcher does for aten's in-place ops."""

    def kernel(keyset, *args):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            spec.overload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        torch.autograd.graph.increment_version([args[i] for i in spec.mutated if args[i] is not None])

    kernel.__name__ = f"posenc_{spec.name}_inplace_view"
    return kernel


def define(schema: str, *, check: Callable, fake: Callable, impls: dict, native: bool = False, device_arg: int = 0,
           factory: bool = False):
    """Define op ``posenc::<name>`` from ``schema`` (its one definition) and record its implementations;
    returns its default overload. Kernels are registered by :func:`finalize` (after every family).
    ``factory``: the op's key comes from its ``Device`` argument (a permanent BackendSelect kernel)."""
    name = schema.split("(", 1)[0]
    if _state["ready"]:  # finalize decides every key from the full op list: a later op would miss the native swap
        raise RuntimeError(f"posenc::{name} is defined after posenc_kernels.ops.registry.finalize()")
    if name in _OPS:
        raise RuntimeError(f"posenc::{name} is defined twice")
    LIB.define(schema)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    mutated = tuple(i for i, a in enumerate(overload._schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
    spec = OpSpec(name, schema, check, fake, dict(impls), native, mutated, device_arg, factory, overload)
    _OPS[name] = spec

    def _fake(*args):
        check(*args, values=False)
        return fake(*args)

    torch.library.register_fake(f"{NAMESPACE}::{name}", _fake, lib=LIB)
    return overload


def spec(name: str) -> OpSpec:
    return _OPS[name]


def _register_static(spec: OpSpec) -> None:
    """Kernels that never change: Python kernels for keys the extension cannot serve for this op."""
    lib = _libs.setdefault("static", torch.library.Library(NAMESPACE, "IMPL"))
    for key in _KEYS:
        if not (spec.native and spec.name in _native.ops_for(key)):
            lib.impl(spec.name, _python_kernel(spec), key)
    if spec.factory:
        lib.impl(spec.name, _factory_kernel(spec), "BackendSelect", with_keyset=True)


def _set_library(slot, build: Optional[Callable]) -> None:
    old = _libs.pop(slot, None)
    if old is not None:
        old._destroy()
    if build is not None:
        lib = torch.library.Library(NAMESPACE, "IMPL")
        build(lib)
        _libs[slot] = lib


def _native_capable(key: str):
    return [s for s in _OPS.values() if s.native and s.name in _native.ops_for(key)]


def _sync() -> None:
    """Make the dispatch table match the backend state (see the module docstring)."""
    if not _state["ready"]:
        return
    overrides = _state["overrides"] > 0
    for key in _KEYS:
        specs = _native_capable(key)
        want = bool(specs) and (overrides or backend_for(specs[0], key.lower(), _state["default"]) == "native")
        if want == bool(_native_on.get(key)):
            continue
        if want:
            _set_library((key, "py"), None)
            _native_on[key] = _native.register(key, True)
        else:
            _native.register(key, False)
            _native_on[key] = []

            def build(lib, specs=specs, key=key):
                for s in specs:
                    lib.impl(s.name, _python_kernel(s), key)

            _set_library((key, "py"), build)
    # The router runs while an override is active, and whenever the CUDA C++ kernels serve the CUDA key (so
    # their calls get the op's check, values included, which those kernels leave to Python).
    route = overrides or bool(_native_on.get("CUDA"))
    if route != ("chooser" in _libs):

        def build_chooser(lib):
            for s in _OPS.values():
                if s.native and not s.factory:  # a factory op's permanent BackendSelect kernel routes already
                    lib.impl(s.name, _chooser_kernel(s), "BackendSelect", with_keyset=True)

        _set_library("chooser", build_chooser if route else None)


def finalize() -> None:
    """Register every kernel, once all families have defined their ops (called by the package import)."""
    with _lock:
        if _state["ready"]:
            return
        _native.load()
        for s in _OPS.values():
            _register_static(s)
        if _native.available() and _native.register("ADInplaceOrView", True):
            pass  # the extension's C++ fallback bumps the version counters of every mutating op
        else:

            def build_views(lib):
                for s in _OPS.values():
                    if s.mutated:
                        lib.impl(s.name, _inplace_view_kernel(s), "ADInplaceOrView", with_keyset=True)

            _set_library("view", build_views)
        _state["ready"] = True
        for key in _KEYS:  # start from Python kernels on every native-capable key, then let _sync decide
            _native_on[key] = []

            def build(lib, key=key):
                for s in _native_capable(key):
                    lib.impl(s.name, _python_kernel(s), key)

            _set_library((key, "py"), build)
        _sync()


def registered_kernels(name: str) -> dict:
    """Which implementation serves each key of ``posenc::<name>`` right now (for tests and the status line)."""
    out = {}
    for key in _KEYS:
        if name in _native_on.get(key, ()):
            out[key] = "native"
        elif torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key):
            out[key] = "python"
    if _OPS[name].factory:
        out["BackendSelect"] = "factory"
    else:
        out["BackendSelect"] = "chooser" if "chooser" in _libs and _OPS[name].native else None
    return out
