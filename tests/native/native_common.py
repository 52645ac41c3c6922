"""Shared by the native-extension tests (tests/test_native*.py): the kernel in force and observed, the
reference check, and the skip/CI rule (a missing extension fails CI, skips elsewhere)."""

import contextlib
import os

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.ops import registry

from conftest import DTYPES, assert_dtype_tolerance

AVAILABLE = _native.has_op("rope", "cpu")
if not AVAILABLE and os.environ.get("CI"):
    raise RuntimeError(f"CI must build and test the native CPU extension; it is unavailable: {_native.load_error()}")
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native extension unavailable: {_native.load_error()}")

ALL_DTYPES = DTYPES + [torch.float64]
rope_ = torch.ops.posenc.rope_.default
rope = torch.ops.posenc.rope.default


# ---------------------------------------------------------------------------------------------
# Helpers: the native kernel, in force and observed
# ---------------------------------------------------------------------------------------------


def cpu_kernel_source(name: str) -> str:
    """The line of the dispatcher's dump naming the CPU kernel of posenc::<name> (where it was registered)."""
    dump = torch._C._dispatch_dump(f"posenc::{name}")
    return next((ln for ln in dump.splitlines() if ln.startswith("CPU:")), "")


def backend_select_source(name: str) -> str:
    """The line of the dispatcher's dump naming the BackendSelect kernel of posenc::<name>."""
    dump = torch._C._dispatch_dump(f"posenc::{name}")
    return next((ln for ln in dump.splitlines() if ln.startswith("BackendSelect:")), "")


def assert_native(name: str) -> None:
    """A CPU call of posenc::<name> in this thread runs the C++ kernel: the registry says so and the
    dispatcher's BackendSelect entry, the chooser that calls it, was registered by csrc/bindings.cpp."""
    assert registry.registered_kernels(name)["CPU"] == "native", registry.registered_kernels(name)
    assert "bindings.cpp" in backend_select_source(name), backend_select_source(name)


@pytest.fixture(autouse=True)
def native_cpu():
    """Process default "native": the C++ chooser runs the C++ kernels (conftest's fixture resets the backend
    to "auto" afterwards)."""
    if not AVAILABLE:
        yield
        return
    pk.set_backend("native")
    assert_native("rope_")
    assert_native("rope")
    yield
    pk.set_backend("auto")


@pytest.fixture
def native_backend():
    """The thread-local override "native": the BackendSelect chooser calls the C++ kernel."""
    with pk.use_backend("native"):
        assert registry.registered_kernels("rope_")["BackendSelect"] == "chooser"
        assert_native("rope_")
        yield


@pytest.fixture
def no_python_kernels(monkeypatch):
    """Fail if an op with a native CPU kernel runs a Python implementation (check + triton/torch) instead."""

    real = registry.run_python

    def refuse(spec, backend, args):
        if spec.native and spec.name in _native.ops_for("CPU"):
            raise AssertionError(f"posenc::{spec.name} ran the Python {backend} implementation, not the native kernel")
        return real(spec, backend, args)  # ops without a native kernel (rope_cos_sin)

    monkeypatch.setattr(registry, "run_python", refuse)


@contextlib.contextmanager
def nan_poisoned_allocations():
    """The out-of-place op allocates its outputs itself (at::empty_like). With deterministic algorithms on,
    PyTorch fills every uninitialised allocation with NaN (torch.utils.deterministic.fill_uninitialized_memory),
    so an element the kernel leaves unwritten stays NaN and fails the comparison."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all()
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev)


@contextlib.contextmanager
def value_checks_off():
    pk.set_value_checks(False)
    try:
        yield
    finally:
        pk.set_value_checks(True)


def tables(P, R, dtype=torch.float32, base=10000.0):
    return pk.rope_cos_sin(P, pk.rope_frequencies(R, base)[0], dtype=dtype)


def make(B, S, Hq, Hk, D, dtype, hf_layout=False):
    if hf_layout:  # [B, H, S, D] storage seen as [B, S, H, D]
        return (torch.randn(B, Hq, S, D, dtype=dtype).transpose(1, 2),
                torch.randn(B, Hk, S, D, dtype=dtype).transpose(1, 2) if Hk else None)  # fmt: skip
    return torch.randn(B, S, Hq, D, dtype=dtype), (torch.randn(B, S, Hk, D, dtype=dtype) if Hk else None)


def op_args(cos=None, sin=None, inv_freq=None, positions=None, offsets=None, offset=0, cu_seqlens=None,
            axis_map=None, attention_factor=1.0, interleaved=False, conjugate=False, exact=False):  # fmt: skip
    """The ops' arguments after q and k, in schema order."""
    return (cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, float(attention_factor),
            interleaved, conjugate, exact)  # fmt: skip


def run_native(q, k, *, inplace=True, **kw):
    """Call the public op: rope_ (in place: returns q, k themselves, each version counter bumped once) or
    rope (out of place, its outputs NaN-poisoned at allocation: an unwritten element fails)."""
    args = op_args(**kw)
    if inplace:
        vq = q._version if not q.is_inference() else None
        assert rope_(q, k, *args) is None
        if vq is not None:  # views of one base (packed QKV) share its counter: one bump per argument
            base = lambda t: t._base if t._is_view() else t  # noqa: E731
            shared = k is not None and base(k) is base(q)
            assert q._version == vq + (2 if shared else 1)
        return q, k
    with nan_poisoned_allocations():
        q_out, k_out = rope(q, k, *args)
    assert q_out.shape == q.shape and q_out.dtype == q.dtype
    if k is None:
        assert k_out.numel() == 0
        return q_out, None
    assert k_out.shape == k.shape
    return q_out, k_out


def check(q, k, cos, sin, *, inplace, what="", positions=None, offsets=0, interleaved=False, conjugate=False):
    """Against the float64 reference (tolerance tied to dtype), every channel: rotated ones within
    tolerance, pass-through ones bit-identical; out of place leaves the inputs alone."""
    kw = dict(positions=positions, offsets=offsets, interleaved=interleaved)
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin, conjugate=conjugate, **kw)
    sin_e = -sin if conjugate else sin
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin_e, **kw)
    q0, k0 = q.clone(), (k.clone() if k is not None else None)
    off_t = offsets if isinstance(offsets, torch.Tensor) else None
    off_i = 0 if isinstance(offsets, torch.Tensor) else offsets
    out_q, out_k = run_native(q, k, cos=cos, sin=sin, positions=positions, offsets=off_t, offset=off_i,
                              interleaved=interleaved, conjugate=conjugate, inplace=inplace)  # fmt: skip
    if not inplace:
        assert torch.equal(q, q0) and (k is None or torch.equal(k, k0)), "out of place modified the inputs"
        assert out_q.data_ptr() != q.data_ptr()
    else:
        assert out_q is q
    assert_dtype_tolerance(out_q, truth_q, eager_q, what=f"{what} q")
    R = 2 * cos.shape[-1]
    assert torch.equal(out_q[..., R:], q0[..., R:]), "pass-through channels changed"
    if k is not None:
        assert_dtype_tolerance(out_k, truth_k, eager_k, what=f"{what} k")
        assert torch.equal(out_k[..., R:], k0[..., R:])


_Q = lambda: torch.randn(2, 3, 4, 16)  # noqa: E731
_K = lambda: torch.randn(2, 3, 2, 16)  # noqa: E731

__all__ = [
    "ALL_DTYPES",
    "AVAILABLE",
    "_K",
    "_Q",
    "assert_native",
    "check",
    "cpu_kernel_source",
    "backend_select_source",
    "make",
    "nan_poisoned_allocations",
    "native_backend",
    "native_cpu",
    "no_python_kernels",
    "op_args",
    "rope",
    "rope_",
    "run_native",
    "tables",
    "value_checks_off",
]
