"""The op layer: one schema per op, one kernel per dispatch key registered once, the backend chosen per call.

:func:`define` declares an op from its schema string (:func:`posenc_kernels.ops.pair.define_pair` an
in-place op and its out-of-place twin). :func:`finalize` registers, once, at import: a Python kernel on CPU
and CUDA (the op's check, then Triton or torch: :func:`python_backend`); the extension's C++ chooser on
BackendSelect where it has a kernel (it runs the C++ kernel or passes the call on, from the backend that
:func:`set_backend` / :func:`use_backend` mirror into it); a Python BackendSelect kernel for a factory op
without one; ADInplaceOrView for mutating ops; the fake. Nothing is registered or removed afterwards, so
threads never see the dispatch table change. ``docs/design.md`` tells the whole story.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch._C import DispatchKey
from torch._library import autograd as _library_autograd  # torch.library.register_autograd's building block

from .. import _native

try:  # Triton is optional on CPU-only machines: the torch backend needs nothing else.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "native", "torch")  # their index is the code the extension reads
NAMESPACE = "posenc"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_KEYS = ("CPU", "CUDA")


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set before import: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_TRITON_ON = {"cpu": HAS_TRITON and interpreter_enabled(), "cuda": HAS_TRITON}  # where auto prefers Triton


@dataclass
class OpSpec:
    """One op: its schema, ``check(*args, values=...)`` (every argument rule; ``values=False`` for fakes:
    no storage, no values), ``impls`` (``"triton"`` / ``"torch"`` -> a Python implementation taking the
    schema's arguments), ``native`` (the extension may implement it), the indices of the arguments it
    writes, and whether it is a factory op (its key comes from its ``Device`` argument)."""

    name: str
    schema: str
    check: Callable
    impls: dict
    native: bool
    mutated: tuple
    factory: bool
    overload: torch._ops.OpOverload


_OPS: dict[str, OpSpec] = {}
_state = {"default": os.environ.get("POSENC_BACKEND", "auto"), "ready": False}
if _state["default"] not in BACKENDS:
    raise ValueError(f"POSENC_BACKEND must be one of {BACKENDS}, got {_state['default']!r}")
_tls = threading.local()


# ----------------------------------------------------------------------------------------------
# The backend: a process setting and a thread-local override, read per call
# ----------------------------------------------------------------------------------------------


def get_backend() -> str:
    """The backend in force in this thread: the innermost :func:`use_backend`, else :func:`set_backend`'s."""
    return getattr(_tls, "backend", None) or _state["default"]


def _check_name(name) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def set_backend(name: str) -> None:
    """Force an implementation for every op, process-wide: ``"auto"`` (default), ``"triton"``,
    ``"native"`` or ``"torch"``.

    ``auto`` runs the Triton kernels on CUDA tensors (and on CPU tensors when the Triton interpreter is on,
    ``TRITON_INTERPRET=1`` before import); on CPU otherwise the op's C++ kernel when the native extension is
    loaded, else the pure-torch implementation. ``native`` forces the extension for the ops that have a
    native kernel (an error where it is unavailable; ops without one run as under ``auto``).
    ``POSENC_BACKEND`` sets the initial value; :func:`use_backend` overrides it in one thread. Nothing is
    re-registered: every call reads the setting.

    >>> import posenc_kernels as pk
    >>> pk.set_backend("torch"); pk.get_backend()
    'torch'
    >>> pk.set_backend("auto")
    """
    _check_name(name)
    _state["default"] = name
    _native.set_backend(BACKENDS.index(name))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops with backend ``name`` inside the block, in this thread only (see :func:`set_backend`).

    >>> import torch, posenc_kernels as pk
    >>> with pk.use_backend("torch"):
    ...     pe = pk.sinusoidal_table(4, 8)
    >>> pe.shape
    torch.Size([4, 8])
    """
    _check_name(name)
    prev = getattr(_tls, "backend", None)
    _tls.backend = name
    _native.set_thread_backend(BACKENDS.index(name))
    try:
        yield
    finally:
        _tls.backend = prev
        _native.set_thread_backend(-1 if prev is None else BACKENDS.index(prev))


def _has_native(spec: OpSpec, device_type: str) -> bool:
    return spec.native and spec.name in _native.ops_for(device_type.upper())


def backend_for(spec: OpSpec, device_type: str, name: Optional[str] = None) -> str:
    """Which implementation runs ``spec`` for tensors on ``device_type`` under backend ``name`` (default: the
    one in force): ``"triton"``, ``"native"`` or ``"torch"`` - the rule the extension's choosers apply too."""
    name = get_backend() if name is None else name
    triton_ok = "triton" in spec.impls and _TRITON_ON.get(device_type, False)
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
        if _has_native(spec, device_type):
            return "native"
        why = _native.load_error() or f"the extension has no {device_type} kernel for {spec.name!r}"
        raise RuntimeError(
            f"backend 'native' was forced but cannot run on {device_type} tensors: {why}. Build it with "
            "POSENC_BUILD_EXT=1 pip install --no-build-isolation . or let it build on first import (needs a C++ "
            "compiler, and nvcc for the CUDA kernels)"
        )
    if triton_ok:
        return "triton"
    return "native" if _has_native(spec, device_type) else "torch"


def python_backend(spec: OpSpec, device_type: str) -> str:
    """The backend of a call that reached the Python kernel: the extension's chooser passed it on, so it is
    Triton or torch (a native choice here means the caller redispatched past the chooser: torch serves)."""
    backend = backend_for(spec, device_type)
    return "torch" if backend == "native" else backend


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def _device_type(args) -> str:
    for a in args:
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
        return run_python(spec, python_backend(spec, _device_type(args)), args)

    kernel.__name__ = f"posenc_{spec.name}_python"
    return kernel


def _factory_kernel(spec: OpSpec):
    """BackendSelect of a factory op without a native chooser: the key of its ``device`` argument."""
    device_arg = next(i for i, a in enumerate(spec.overload._schema.arguments) if a.type.kind() == "DeviceObjType")
    keys = {"cpu": DispatchKey.CPU, "cuda": DispatchKey.CUDA, "meta": DispatchKey.Meta}

    def kernel(keyset, *args):
        device_type = torch.device(args[device_arg]).type
        if device_type not in keys:
            raise RuntimeError(f"{NAMESPACE}::{spec.name} has no kernel for device {device_type!r}")
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


def define(schema: str, *, check: Callable, fake: Callable, impls: dict, native: bool = False,
           factory: bool = False) -> torch._ops.OpOverload:  # fmt: skip
    """Define op ``posenc::<name>`` from ``schema`` (its one definition) with its check, fake and Python
    implementations; returns its default overload. Kernels are registered by :func:`finalize` (at once for an
    op defined after it)."""
    name = schema.split("(", 1)[0]
    if name in _OPS:
        raise RuntimeError(f"{NAMESPACE}::{name} is defined twice")
    LIB.define(schema)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    args = overload._schema.arguments
    mutated = tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write)
    _OPS[name] = OpSpec(name, schema, check, dict(impls), native, mutated, factory, overload)

    def _fake(*args):
        check(*args, values=False)
        return fake(*args)

    torch.library.register_fake(f"{NAMESPACE}::{name}", _fake, lib=LIB)
    if _state["ready"]:  # an op declared after import (an extension of the package): its kernels now, once
        _register(_OPS[name])
    return overload


def spec(name: str) -> OpSpec:
    return _OPS[name]


def _register(s: OpSpec) -> None:
    """Register the op's kernels, once (see the module docstring)."""
    lib = _state["impl"]
    for key in _KEYS:
        lib.impl(s.name, _python_kernel(s), key)
    if s.factory and s.name not in _native.ops_for("BackendSelect"):
        lib.impl(s.name, _factory_kernel(s), "BackendSelect", with_keyset=True)
    if s.mutated and not _native.available():  # else the extension's ADInplaceOrView kernels serve
        lib.impl(s.name, _inplace_view_kernel(s), "ADInplaceOrView", with_keyset=True)


def _tangents(names, args) -> Optional[dict]:
    """The forward-mode tangents of the op's tensor arguments, by name (None when there are none)."""
    found = None
    for n, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            t = fwAD.unpack_dual(a).tangent
            if t is not None:
                found = {} if found is None else found
                found[n] = t
    return found


def grad_refusal(name: str, arg: str, differentiable: tuple) -> str:
    """The error for a gradient asked of argument ``arg`` of op ``name``, which gives ``differentiable``'s."""
    if not differentiable:
        return (
            f"{arg} requires grad, but {NAMESPACE}::{name} is not differentiable (it writes buffers such as a KV "
            f"cache): call it under torch.no_grad() / inference_mode, or pass {arg}.detach()"
        )
    return f"{arg} requires grad, but {NAMESPACE}::{name} gives gradients for {' and '.join(differentiable)} only: pass {arg}.detach()"


def register_autograd(name: str, backward: Callable, *, setup_context: Callable, differentiable: tuple,
                      jvp: Optional[Callable] = None) -> None:  # fmt: skip
    """The op's autograd, once, on the Autograd key: reverse mode from ``backward`` / ``setup_context`` (as
    ``torch.library.register_autograd``, whose building block it reuses), and forward mode (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) from ``jvp(primals, tangents)``: ``primals`` the op's arguments without
    their tangents, ``tangents`` a dict of the tangents present by argument name; it returns the output's
    tangent (a tuple for several outputs, None for an output without one), computed with differentiable ops.

    ``differentiable`` names the arguments that get gradients and tangents. A tangent on any other argument
    (or any tangent when ``jvp`` is None) raises NotImplementedError naming the op and the argument, and a
    gradient asked of any other argument raises ValueError: never a silent zero tangent or None gradient
    (``torch.library.register_autograd`` alone gives zero tangents: it never sees forward-mode duals)."""
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    names = [a.name for a in op._schema.arguments]
    reverse = _library_autograd.make_autograd_impl(op, _library_autograd.Info(backward, setup_context))
    multi = len(op._schema.returns) > 1

    def kernel(keyset, *args):
        tangents = _tangents(names, args) if fwAD._current_level >= 0 else None
        if tangents is None:
            if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
                for n, a in zip(names, args):
                    if isinstance(a, torch.Tensor) and a.requires_grad and n not in differentiable:
                        raise ValueError(grad_refusal(name, n, differentiable))
            return reverse(keyset, *args)
        for n in tangents:
            if jvp is None or n not in differentiable:
                raise NotImplementedError(
                    f"forward-mode AD is not supported by posenc::{name} w.r.t. {n} ({n} is a dual tensor)"
                    + (f"; it is for {' and '.join(differentiable)}" if jvp is not None else "")
                )
        primals = tuple(fwAD.unpack_dual(a).primal if isinstance(a, torch.Tensor) else a for a in args)
        out = op(*primals)
        tangent = jvp(primals, tangents)
        if not multi:
            return fwAD.make_dual(out, tangent)
        return tuple(o if t is None else fwAD.make_dual(o, t) for o, t in zip(out, tangent))

    kernel.__name__ = f"posenc_{name}_autograd"
    LIB.impl(name, kernel, "Autograd", with_keyset=True)


def finalize() -> None:
    """Load the native extension and register every kernel, once, after all families have defined their
    ops (called by the package import); an op defined later gets its kernels when it is defined."""
    if _state["ready"]:
        return
    if _native.load():
        _native.set_triton(_TRITON_ON["cpu"], _TRITON_ON["cuda"])
        _native.set_backend(BACKENDS.index(_state["default"]))
    _state["impl"] = torch.library.Library(NAMESPACE, "IMPL")
    for s in _OPS.values():
        _register(s)
    _state["ready"] = True


def registered_kernels(name: str) -> dict:
    """What serves ``posenc::<name>`` for a call in this thread right now (for tests and the status line):
    ``"native"`` (the C++ chooser runs the C++ kernel) or ``"python"`` per device key, and the BackendSelect
    kernel (``"chooser"``: the extension's; ``"factory"``: Python's; None)."""
    s = _OPS[name]
    out = {}
    for key in _KEYS:
        try:
            out[key] = "native" if backend_for(s, key.lower()) == "native" else "python"
        except RuntimeError:  # a forced backend that cannot run there
            out[key] = "python"
    if name in _native.ops_for("BackendSelect"):
        out["BackendSelect"] = "chooser"
    else:
        out["BackendSelect"] = "factory" if s.factory else None
    return out
