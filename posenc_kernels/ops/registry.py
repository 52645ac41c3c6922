"""The op layer: one schema per op, one implementation per dispatch key, the backend read in one place.

Every public op is defined here once, by its schema string (:func:`define`), in the ``posenc`` namespace.
Its implementations are registered with the dispatcher, never picked by the code above it:

* **Meta / fake**: the op's check plus its output shapes (:class:`OpSpec` ``check`` and ``fake``).
* **CPU** and **CUDA**: a Python kernel, registered once: the op's check, then the Triton launcher or the
  pure-torch implementation (:func:`backend_for`).
* **BackendSelect**: with the native extension loaded, its C++ chooser (``csrc/native_ops.h``), registered
  once by the extension itself: per call it runs the C++ kernel directly when the backend selection says
  native for the call's device, else redispatches to the Python kernel. The selection lives in C++ (a
  process default and a thread-local override) and is set by :func:`set_backend` / :func:`use_backend`
  through ``_native.set_backend`` / ``set_thread_backend``. Nothing is registered or removed after import.
* **ADInplaceOrView** (mutating ops): bumps the version counters of what the op writes - the extension's
  C++ kernels when loaded, else a Python kernel.
* **Autograd**: registered once per functional op (``register_autograd``); the in-place ops get theirs from
  the autograd.Function of their public function (PyTorch cannot register a formula for a mutating op).

Factory ops (``define(..., factory=True)``: ``sinusoidal_table``, whose only tensor argument is optional)
give the dispatcher no tensor to pick a key from: their BackendSelect kernel (the C++ chooser, or without
the extension a Python one) takes the key from their ``device`` argument, as ATen's factory functions do.

(This file is the minimal adapter of issue 17's contract in the native-once branch: the lead's registry
replaces it.)
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
_state = {"default": os.environ.get("POSENC_BACKEND", "auto"), "ready": False}
if _state["default"] not in BACKENDS:
    raise ValueError(f"POSENC_BACKEND must be one of {BACKENDS}, got {_state['default']!r}")
_tls = threading.local()
_lock = threading.RLock()
_libs: dict = {}  # "static" -> the Library of the Python kernels


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
        _native.set_backend(_native.BACKEND_CODES[name])


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
    stack.append(name)
    _native.set_thread_backend(_native.BACKEND_CODES[name])
    try:
        yield
    finally:
        stack.pop()
        _native.set_thread_backend(_native.BACKEND_CODES[stack[-1]] if stack else -1)


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
        device_type = _device_type(spec, args)
        backend = backend_for(spec, device_type)
        if backend == "native":
            # The C++ chooser sent the call here, so it read another selection than this thread reads now:
            # a set_backend racing in another thread. Either choice is right then; run the Python one.
            backend = "triton" if _triton_ok(spec, device_type) else "torch"
        return run_python(spec, backend, args)

    kernel.__name__ = f"posenc_{spec.name}_python"
    return kernel


def _triton_ok(spec: OpSpec, device_type: str) -> bool:
    return HAS_TRITON and "triton" in spec.impls and (device_type == "cuda" or (device_type == "cpu" and _INTERPRET))


def _factory_kernel(spec: OpSpec):
    """The BackendSelect kernel of a factory op without the extension: the backend of its ``device``."""
    device_arg = next(i for i, a in enumerate(spec.overload._schema.arguments) if a.type.kind() == "DeviceObjType")
    keys = {"cpu": DispatchKey.CPU, "cuda": DispatchKey.CUDA, "meta": DispatchKey.Meta}

    def kernel(keyset, *args):
        device_type = torch.device(args[device_arg]).type
        if device_type not in keys:
            raise RuntimeError(f"posenc::{spec.name} has no kernel for device {device_type!r}")
        return spec.overload.redispatch(torch._C.DispatchKeySet(keys[device_type]), *args)

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


def _register(spec: OpSpec) -> None:
    """Every kernel of ``spec``, once: Python kernels on CPU and CUDA; BackendSelect (factory ops) and
    ADInplaceOrView (mutating ops) where the extension registered none."""
    lib = _libs.setdefault("static", torch.library.Library(NAMESPACE, "IMPL"))
    for key in _KEYS:
        lib.impl(spec.name, _python_kernel(spec), key)
    if spec.factory and spec.name not in _native.ops_for("BackendSelect"):
        lib.impl(spec.name, _factory_kernel(spec), "BackendSelect", with_keyset=True)
    if spec.mutated and spec.name not in _native.ops_for("ADInplaceOrView"):
        lib.impl(spec.name, _inplace_view_kernel(spec), "ADInplaceOrView", with_keyset=True)


def finalize() -> None:
    """Register every kernel, once all families have defined their ops (called by the package import)."""
    with _lock:
        if _state["ready"]:
            return
        _native.load()
        _native.set_triton(cpu=HAS_TRITON and _INTERPRET, cuda=HAS_TRITON)
        _native.set_backend(_native.BACKEND_CODES[_state["default"]])
        for s in _OPS.values():
            _register(s)
        _state["ready"] = True


def registered_kernels(name: str) -> dict:
    """Which implementation serves each key of ``posenc::<name>`` for a call in this thread right now (for
    tests and the status line): ``"native"`` (the C++ chooser runs the C++ kernel) or ``"python"`` per
    device key, and the BackendSelect kernel (``"chooser"``: the extension's; ``"factory"``: Python's)."""
    spec = _OPS[name]
    out = {}
    for key in _KEYS:
        try:
            native = backend_for(spec, key.lower()) == "native"
        except RuntimeError:
            native = False
        out[key] = "native" if native else "python"
    if name in _native.ops_for("BackendSelect"):
        out["BackendSelect"] = "chooser"
    else:
        out["BackendSelect"] = "factory" if spec.factory else None
    return out
