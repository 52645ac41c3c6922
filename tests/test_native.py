"""The C++ extension (csrc/) on CPU: its kernels for the public ops posenc::rope_ / posenc::rope (and the
sinusoidal / learned ops) against the references.

The extension registers its kernels straight for the public ops' CPU key (``_native_register``, see
csrc/bindings.cpp) when it is loaded and the backend is native; every test here checks that the C++ kernel
is the one that runs, not the op layer's Python fallback (:func:`assert_native`).

Values (fp32/fp16/bf16/fp64, NeoX/GPT-J, partial rotary, GQA, positions/offsets, HF-transposed strides,
non-unit channel strides in place, packed [T, H, D] with cu_seqlens, multi-axis positions (axis_map), in
place and out of place, tables and on-the-fly/exact angles), value checks with the Python messages (NaN
for rows outside the table with value checks off), errors for bad input, aliasing, inference tensors,
version counters, the enable/disable cycle of the registration, opcheck, the ISA variants, and the public
API under ``use_backend("native")`` (values, gradients, torch.compile); the sinusoidal and learned kernels
through their public API. Skipped when the extension cannot be built here - except in CI (``CI`` set),
where a missing extension fails the run.
"""

import contextlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.ops import registry
from posenc_kernels.ops.rope.op import check_rope

from conftest import DTYPES, assert_dtype_tolerance, max_err

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


def assert_native(name: str) -> None:
    """posenc::<name>'s CPU key is served by the C++ kernel: the registry says so and the dispatcher's
    CPU entry was registered by csrc/bindings.cpp (not a Python kernel of posenc_kernels/ops)."""
    assert registry.registered_kernels(name)["CPU"] == "native", registry.registered_kernels(name)
    assert "bindings.cpp" in cpu_kernel_source(name), cpu_kernel_source(name)


@pytest.fixture(autouse=True)
def native_cpu():
    """Process default "native": the C++ kernels sit on the CPU key, no BackendSelect router in between
    (conftest's fixture resets the backend to "auto" afterwards)."""
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
    """The thread-local override: the BackendSelect router is active and redispatches to the C++ kernel."""
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


# ---------------------------------------------------------------------------------------------
# The extension itself, and its registration
# ---------------------------------------------------------------------------------------------


def test_loaded_from_expected_source():
    """CI builds ahead of time (POSENC_BUILD_EXT=1) in one pass and just in time in the other: each must
    load what it built, not fall back to the other silently."""
    assert _native.source() in ("aot", "jit")
    if os.environ.get("POSENC_NATIVE") == "jit":
        assert _native.source() == "jit"
    elif os.environ.get("POSENC_BUILD_EXT") == "1":
        assert _native.source() == "aot", _native.load_error()
    assert _native.has_op("rope", "cpu") and _native.has_op("rope_", "cpu")
    assert {"rope_", "rope"} <= _native.ops_for("CPU")
    assert not _native.has_op("no_such_op", "cpu")
    assert not _native.has_op("rope", "xpu")
    assert set(torch.ops.posenc._native_ops("CPU")) == set(_native.ops_for("CPU"))
    assert {"rope_"} <= set(torch.ops.posenc._native_ops("ADInplaceOrView"))
    with pytest.raises(ValueError, match='key must be "CPU"'):
        torch.ops.posenc._native_ops("XPU")
    with pytest.raises(ValueError, match='key must be "CPU"'):
        torch.ops.posenc._native_register("XPU", True)
    # The old internal ops are gone: the public ops are the only entry points.
    assert not hasattr(torch.ops.posenc, "native_rope")
    assert not hasattr(torch.ops.posenc, "native_sinusoidal")


def test_native_kernel_is_the_one_that_runs():
    """The C++ kernel raises its own messages ("rope: ..."): the Python check says it differently."""
    q = torch.randint(0, 3, (2, 3, 4, 16))
    cos, sin = tables(8, 16)
    with pytest.raises(TypeError, match="^rope: q must be float16/bfloat16/float32/float64"):
        rope_(q, None, *op_args(cos, sin))
    with pytest.raises(TypeError, match="^rope: q must be float16/bfloat16/float32/float64"):
        rope(q, None, *op_args(cos, sin))


def test_router_redispatches_to_native(native_backend, no_python_kernels):
    """Under use_backend("native") the BackendSelect router is active and continues to the C++ kernel."""
    q, k = make(2, 3, 4, 2, 16, torch.float32)
    cos, sin = tables(8, 16)
    check(q, k, cos, sin, inplace=True)
    check(q, k, cos, sin, inplace=False, offsets=2)
    with pytest.raises(TypeError, match="^rope: q must be float16"):
        rope_(torch.randint(0, 3, (2, 3, 4, 16)), None, *op_args(cos, sin))


def test_native_register_cycle():
    """_native_register(key, enable): disable removes the C++ kernels from the dispatcher, enable puts them
    back (idempotent); the registry's own switch (set_backend) does the same; the state is restored."""
    cpu_ops = set(_native.ops_for("CPU"))
    defined = sorted(cpu_ops & set(registry._OPS))
    assert {"rope_", "rope"} <= set(defined)
    q, k = make(1, 3, 2, 1, 16, torch.float32)
    cos, sin = tables(3, 16)
    want_q, want_k = pk.apply_rope(q, k, cos, sin)
    try:
        off = torch.ops.posenc._native_register("CPU", False)
        assert set(off) == cpu_ops
        for name in defined:
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"posenc::{name}", "CPU"), name
        with pytest.raises(NotImplementedError):
            rope_(q.clone(), None, *op_args(cos, sin))
        assert set(torch.ops.posenc._native_register("CPU", False)) == cpu_ops  # disabling twice: a no-op
        for _ in range(2):  # enabling twice: the second is a no-op
            assert set(torch.ops.posenc._native_register("CPU", True)) == cpu_ops
            for name in defined:
                assert_native(name)
        q2, k2 = q.clone(), k.clone()
        rope_(q2, k2, *op_args(cos, sin))
        assert torch.equal(q2, want_q) and torch.equal(k2, want_k)
        # The version-counter kernel (ADInplaceOrView) too.
        assert torch.ops.posenc._native_register("ADInplaceOrView", False)
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("posenc::rope_", "ADInplaceOrView")
        assert torch.ops.posenc._native_register("ADInplaceOrView", True)
        assert torch._C._dispatch_has_kernel_for_dispatch_key("posenc::rope_", "ADInplaceOrView")
        v = q2._version
        rope_(q2, None, *op_args(cos, sin))
        assert q2._version == v + 1
    finally:
        torch.ops.posenc._native_register("ADInplaceOrView", True)
        torch.ops.posenc._native_register("CPU", True)
    # Through the registry: another backend puts the Python kernels on CPU, native brings the C++ ones back.
    pk.set_backend("torch")
    for name in defined:
        assert registry.registered_kernels(name)["CPU"] == "python", name
        assert "bindings.cpp" not in cpu_kernel_source(name)
    q3 = q.clone()
    pk.apply_rope_(q3, None, cos, sin)
    assert max_err(q3, want_q) < 1e-6
    pk.set_backend("native")
    for name in defined:
        assert_native(name)
    q4 = q.clone()
    rope_(q4, None, *op_args(cos, sin))
    assert torch.equal(q4, want_q)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("config", list(MODEL_CONFIGS.values()), ids=lambda c: c.name)
def test_model_configs(config, dtype):
    q, k = make(2, 13, config.num_heads_q, config.num_heads_kv, config.head_dim, dtype)
    cos, sin = tables(20, config.rotary_dim)
    check(q, k, cos, sin, inplace=True, offsets=3, interleaved=config.interleaved, what=config.name)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("D,R", [(128, 128), (80, 80), (96, 64), (64, 6), (130, 34)])
def test_layouts(D, R, dtype, interleaved, inplace):
    """Head dims around the vector width (tails), partial rotary (pass-through copied out of place), GQA,
    an HF-transposed q and a contiguous k."""
    q, _ = make(2, 7, 5, 0, D, dtype, hf_layout=True)
    _, k = make(2, 7, 0, 2, D, dtype)
    cos, sin = tables(16, R)
    check(q, k, cos, sin, inplace=inplace, offsets=4, interleaved=interleaved, what=f"D={D} R={R}")


@pytest.mark.parametrize("idx", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mode", ["positions_bs", "positions_s", "offsets", "strided_positions"])
def test_position_sources(mode, idx):
    B, S = 3, 9
    q, k = make(B, S, 4, 2, 64, torch.float32)
    cos, sin = tables(40, 64)
    positions, offsets = None, 0
    if mode == "positions_bs":
        positions = torch.randint(0, 40, (B, S), dtype=idx)
    elif mode == "positions_s":
        positions = torch.randint(0, 40, (S,), dtype=idx)
    elif mode == "strided_positions":
        positions = torch.randint(0, 40, (S, B), dtype=idx).t()  # [B, S] with strides (1, B)
    else:
        offsets = torch.tensor([0, 5, 31], dtype=idx)
    check(q, k, cos, sin, inplace=True, positions=positions, offsets=offsets, what=mode)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_conjugate_inverts(interleaved):
    q, k = make(2, 5, 3, 1, 32, torch.float64)
    cos, sin = ref.rope_cos_sin_reference(torch.arange(8), ref.rope_frequencies_reference(32))  # cos^2+sin^2=1
    check(q.clone(), k.clone(), cos, sin, inplace=False, conjugate=True, interleaved=interleaved)
    q2, k2 = run_native(q.clone(), k.clone(), cos=cos, sin=sin, interleaved=interleaved)
    run_native(q2, k2, cos=cos, sin=sin, interleaved=interleaved, conjugate=True)
    assert max_err(q2, q) < 1e-12 and max_err(k2, k) < 1e-12


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_table_dtypes_and_row_stride(table_dtype):
    """Tables of any float dtype are used as they are; a row stride other than R/2 (a column slice)."""
    q, k = make(1, 6, 2, 1, 32, torch.float32)
    wide_c, wide_s = tables(10, 64, dtype=table_dtype)
    cos, sin = wide_c[:, :16], wide_s[:, :16]  # row stride 32, R/2 = 16
    assert cos.stride() == (32, 1)
    check(q, k, cos, sin, inplace=False)
    check(q, k, wide_c.t().contiguous().t()[:, :16], wide_s.t().contiguous().t()[:, :16], inplace=False,
          what="column-major tables")  # fmt: skip


def test_qk_in_one_buffer():
    """q and k as head slices of one packed QKV buffer, rotated in place."""
    qkv = torch.randn(2, 5, 4 + 2 + 2, 64)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    v0 = qkv[:, :, 6:].clone()
    cos, sin = tables(5, 64)
    check(q, k, cos, sin, inplace=True)
    assert torch.equal(qkv[:, :, 6:], v0)


@pytest.mark.parametrize("exact", [False, True], ids=["fp32_angles", "exact"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_on_the_fly_angles(exact, interleaved):
    """inv_freq instead of tables: default = fp32(pos) * fp32(inv_freq) then fp32 cos/sin (bit-for-bit the
    rope_cos_sin tables); exact = fp64 angle reduced mod 2 pi, within 1e-6 rad of the truth at large positions."""
    B, S, D = 2, 5, 64
    q, k = make(B, S, 4, 2, D, torch.float32)
    inv64 = pk.rope_frequencies(D, 500000.0)[0].to(torch.float64)
    positions = torch.tensor([[0, 1, 77, 4095, 70000], [2**20, 2**21 + 3, 2**22 - 1, 12345, 5]])
    af = 1.25
    rows = torch.arange(B * S).view(B, S)
    if exact:
        out_q, out_k = run_native(q, k, inv_freq=inv64, positions=positions, attention_factor=af,
                                  interleaved=interleaved, exact=True, inplace=False)  # fmt: skip
        c64, s64 = ref.rope_cos_sin_reference(positions, inv64, af)  # [B, S, R/2] float64
        truth_q, truth_k = ref.rope_reference(q, k, c64.flatten(0, 1), s64.flatten(0, 1), positions=rows,
                                              interleaved=interleaved)  # fmt: skip
        # 1e-6 rad of angle error on |x| <= ~5 and a factor 1.25: well under 1e-4, plus fp32 rounding.
        assert max_err(out_q, truth_q) < 1e-4 and max_err(out_k, truth_k) < 1e-4
    else:
        inv = pk.rope_frequencies(D, 500000.0)[0]
        out_q, out_k = run_native(q, k, inv_freq=inv, positions=positions, attention_factor=af,
                                  interleaved=interleaved, inplace=False)  # fmt: skip
        # The truth of HF numerics: the fp32 angle (one fp32 product), its cos/sin in float64.
        angle = (positions.flatten().float()[:, None] * inv.float()[None, :]).double()
        truth_q, truth_k = ref.rope_reference(q, k, angle.cos() * af, angle.sin() * af, positions=rows,
                                              interleaved=interleaved)  # fmt: skip
        assert max_err(out_q, truth_q) < 5e-6 and max_err(out_k, truth_k) < 5e-6
    # in place gives the same bits
    q2, k2 = q.clone(), k.clone()
    run_native(q2, k2, inv_freq=inv64 if exact else inv, positions=positions, attention_factor=af,
               interleaved=interleaved, exact=exact)  # fmt: skip
    assert torch.equal(q2, out_q) and torch.equal(k2, out_k)


def test_exact_angles_precise():
    """At position 2**22 - 1 the fp32 product is off by radians; the exact mode is within 1e-6 rad."""
    inv64 = pk.rope_frequencies(2, 10000.0)[0].to(torch.float64)  # inv_freq = [1.0]: angle = position
    pos = torch.tensor([2**22 - 1, 3_000_001, 123_457])
    q = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    q[..., 0] = 1.0  # (1, 0) rotated by theta = (cos theta, sin theta)
    out, _ = run_native(q, None, inv_freq=inv64, positions=pos, exact=True, inplace=False)
    theta = torch.atan2(out[0, :, 0, 1], out[0, :, 0, 0])
    want = torch.remainder(pos.double() + torch.pi, 2 * torch.pi) - torch.pi
    assert (theta - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parallel_large(dtype):
    """Enough items for several threads' chunks, cos/sin rows changing inside a chunk."""
    q, k = make(2, 300, 6, 2, 64, dtype)
    cos, sin = tables(512, 64)
    check(q, k, cos, sin, inplace=True, positions=torch.randint(0, 512, (2, 300)))
    check(q, k, cos, sin, inplace=False, positions=torch.randint(0, 512, (2, 300)))


# ---- packed [T, H, D]: cu_seqlens (+ offsets), per-token positions


def cu_positions(cu, offsets, offset, T):
    """Per-token positions of a packed batch, by the definition (tokens past cu[-1]: position 0)."""
    pos = [0] * T
    cu = [int(v) for v in cu]
    for n in range(len(cu) - 1):
        start = int(offsets[n]) if offsets is not None else offset
        for t in range(cu[n], cu[n + 1]):
            pos[t] = t - cu[n] + start
    return torch.tensor(pos)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("starts", ["offsets", "offset", "zero"])
def test_cu_seqlens(starts, dtype, inplace):
    """Packed varlen q [T, Hq, D], k [T, Hk, D]: an empty sequence, a padded tail past cu_seqlens[-1]
    (position 0), positions restarting at offsets[n] (or the int offset) per sequence."""
    T, D = 14, 48
    cu = torch.tensor([0, 3, 3, 7, 12], dtype=torch.int32)
    offsets = torch.tensor([5, 0, 2, 10]) if starts == "offsets" else None
    offset = 4 if starts == "offset" else 0
    q, k = torch.randn(T, 4, D, dtype=dtype), torch.randn(T, 2, D, dtype=dtype)
    cos, sin = tables(20, 32)
    pos = cu_positions(cu, offsets, offset, T)
    truth_q, truth_k = ref.rope_reference(q[None], k[None], cos, sin, positions=pos[None])
    eager_q, eager_k = ref.rope_hf_eager(q[None], k[None], cos, sin, positions=pos[None])
    q0, k0 = q.clone(), k.clone()
    out_q, out_k = run_native(q, k, cos=cos, sin=sin, cu_seqlens=cu, offsets=offsets, offset=offset,
                              inplace=inplace)  # fmt: skip
    assert (out_q is q) == inplace
    assert_dtype_tolerance(out_q[None], truth_q, eager_q, what="cu_seqlens q")
    assert_dtype_tolerance(out_k[None], truth_k, eager_k, what="cu_seqlens k")
    assert torch.equal(out_q[..., 32:], q0[..., 32:]) and torch.equal(out_k[..., 32:], k0[..., 32:])
    if not inplace:
        assert torch.equal(q, q0) and torch.equal(k, k0)


def test_cu_seqlens_on_the_fly():
    T, D = 9, 32
    cu = torch.tensor([0, 4, 9])
    offsets = torch.tensor([100, 70000])
    q = torch.randn(T, 3, D)
    inv = pk.rope_frequencies(D)[0]
    out, _ = run_native(q, None, inv_freq=inv, cu_seqlens=cu, offsets=offsets, inplace=False)
    pos = cu_positions(cu, offsets, 0, T)
    angle = (pos.float()[:, None] * inv[None, :]).double()
    truth, _ = ref.rope_reference(q[None], None, angle.cos(), angle.sin(), positions=torch.arange(T)[None])
    assert max_err(out[None], truth) < 5e-6


@pytest.mark.parametrize("source", ["positions", "offset", "offsets"])
def test_packed_3d(source):
    """Packed [T, H, D] without cu_seqlens: one sequence (B = 1), per-token positions [T], an int offset or
    a [1] offsets tensor."""
    T = 11
    q, k = torch.randn(T, 4, 64), torch.randn(T, 1, 64)
    cos, sin = tables(30, 64)
    kw = {"positions": torch.randint(0, 30, (T,))} if source == "positions" else {}
    offsets = {"offset": 7, "offsets": torch.tensor([9])}.get(source, 0)
    for inplace in (False, True):
        qq, kk = q.clone(), k.clone()
        pos = kw.get("positions")
        truth_q, truth_k = ref.rope_reference(qq[None], kk[None], cos, sin, positions=pos, offsets=offsets)
        eager_q, eager_k = ref.rope_hf_eager(qq[None], kk[None], cos, sin, positions=pos, offsets=offsets)
        off_t = offsets if isinstance(offsets, torch.Tensor) else None
        off_i = offsets if isinstance(offsets, int) else 0
        out_q, out_k = run_native(qq, kk, cos=cos, sin=sin, offsets=off_t, offset=off_i, inplace=inplace, **kw)
        assert_dtype_tolerance(out_q[None], truth_q, eager_q, what=f"packed q {source}")
        assert_dtype_tolerance(out_k[None], truth_k, eager_k, what=f"packed k {source}")


# ---- multi-axis positions (M-RoPE): axis_map


def axis_tables(cos, sin, positions, axis_map, B, S):
    """Per-token tables [B * S, R/2] of a multi-axis call: frequency i of token (b, s) takes table row
    positions[axis_map[i], b, s] (positions [A, S] broadcast over the batch)."""
    p = positions.to(torch.int64)
    if p.dim() == 2:
        p = p[:, None, :].expand(-1, B, S)
    rows = p[axis_map.to(torch.int64)].permute(1, 2, 0)  # [B, S, R/2]
    i = torch.arange(cos.shape[1])
    return cos[rows, i].flatten(0, 1), sin[rows, i].flatten(0, 1)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("pos_shape", ["ABS", "AS"])
def test_axis_map_tables(pos_shape, dtype, inplace):
    """Qwen2-VL: head_dim 128, mrope_section [16, 24, 24] (time, height, width), positions [3, B, S]."""
    B, S, D = 2, 7, 128
    axis_map = pk.mrope_axis_map([16, 24, 24])
    assert axis_map.shape == (64,)
    positions = torch.randint(0, 50, (3, B, S) if pos_shape == "ABS" else (3, S))
    q, k = make(B, S, 4, 2, D, dtype, hf_layout=True)
    cos, sin = tables(50, D, base=1e6)
    c_eff, s_eff = axis_tables(cos, sin, positions, axis_map, B, S)
    rows = torch.arange(B * S).view(B, S)
    truth_q, truth_k = ref.rope_reference(q, k, c_eff, s_eff, positions=rows)
    eager_q, eager_k = ref.rope_hf_eager(q, k, c_eff, s_eff, positions=rows)
    out_q, out_k = run_native(q, k, cos=cos, sin=sin, positions=positions, axis_map=axis_map, inplace=inplace)
    assert_dtype_tolerance(out_q, truth_q, eager_q, what="axis_map q")
    assert_dtype_tolerance(out_k, truth_k, eager_k, what="axis_map k")


@pytest.mark.parametrize("interleaved_sections", [False, True], ids=["qwen2vl", "qwen3vl"])
def test_axis_map_on_the_fly(interleaved_sections):
    B, S, D = 2, 5, 128
    axis_map = pk.mrope_axis_map([16, 24, 24], interleaved=interleaved_sections).to(torch.int64)
    positions = torch.randint(0, 5000, (3, B, S))
    inv = pk.rope_frequencies(D, 1e6)[0]
    q, k = make(B, S, 4, 2, D, torch.float32)
    out_q, out_k = run_native(q, k, inv_freq=inv, positions=positions, axis_map=axis_map, inplace=False)
    pos_i = positions[axis_map].permute(1, 2, 0).flatten(0, 1)  # [B * S, R/2]: position of frequency i
    angle = (pos_i.float() * inv[None, :]).double()  # one fp32 product, cos/sin in float64
    rows = torch.arange(B * S).view(B, S)
    truth_q, truth_k = ref.rope_reference(q, k, angle.cos(), angle.sin(), positions=rows)
    assert max_err(out_q, truth_q) < 5e-6 and max_err(out_k, truth_k) < 5e-6
    # one axis for every frequency = plain RoPE with that axis' positions
    q2 = q.clone()
    run_native(q2, None, inv_freq=inv, positions=positions, axis_map=torch.full((64,), 2))
    want, _ = run_native(q, None, inv_freq=inv, positions=positions[2], inplace=False)
    assert torch.equal(q2, want)


# ---- any strides, the channel stride too (scalar path, in place without a copy)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_channel_strides_in_place(dtype, interleaved):
    """q with channel stride 2 (every other channel of a buffer), k with channel stride 3 and a transposed
    [B, S, D, H] q: rotated in place through their strides - the data pointer unchanged (no copy), the
    neighbouring channels of the buffer untouched; partial rotary leaves the pass-through channels alone."""
    B, S, D, R = 2, 5, 24, 16
    cos, sin = tables(8, R)
    qbuf = torch.randn(B, S, 3, 2 * D, dtype=dtype)
    kbuf = torch.randn(B, S, 2, 3 * D, dtype=dtype)
    q, k = qbuf[..., ::2], kbuf[..., 1::3]
    assert q.stride(-1) == 2 and k.stride(-1) == 3
    qbuf0, kbuf0 = qbuf.clone(), kbuf.clone()
    ptrs = (q.data_ptr(), k.data_ptr())
    check(q, k, cos, sin, inplace=True, offsets=1, interleaved=interleaved, what="channel strides")
    assert (q.data_ptr(), k.data_ptr()) == ptrs
    assert torch.equal(qbuf[..., 1::2], qbuf0[..., 1::2]), "q's neighbouring channels were written"
    assert torch.equal(kbuf[..., 0::3], kbuf0[..., 0::3]) and torch.equal(kbuf[..., 2::3], kbuf0[..., 2::3])
    qt = torch.randn(B, S, D, 3, dtype=dtype).transpose(-1, -2)  # [B, S, H, D] with strides (.., 1, 3)
    assert qt.stride(-1) == 3
    check(qt, None, cos, sin, inplace=True, interleaved=interleaved, what="transposed channels")
    check(qt, None, cos, sin, inplace=False, interleaved=interleaved, what="transposed channels out of place")
    check(q, k, cos, sin, inplace=False, interleaved=interleaved, what="channel strides out of place")


def test_out_of_table_rows_are_nan():
    """With value checks off the kernel never reads outside the table: such tokens come out NaN (this is
    the last line of defence; with checks on the op raises, see test_value_check_messages)."""
    q, k = make(1, 4, 2, 1, 16, torch.float32)
    cos, sin = tables(8, 8)  # partial: pass-through channels stay finite
    positions = torch.tensor([[0, 8, -1, 7]])
    bad = torch.tensor([False, True, True, False])
    with value_checks_off():
        out_q, out_k = run_native(q, k, cos=cos, sin=sin, positions=positions, inplace=False)
        for out, x in ((out_q, q), (out_k, k)):
            assert torch.isnan(out[0, bad, :, :8]).all()
            assert not torch.isnan(out[0, ~bad]).any()
            assert torch.equal(out[..., 8:], x[..., 8:])
        q2 = q.clone()
        run_native(q2, None, cos=cos, sin=sin, positions=positions)  # in place too
        assert torch.isnan(q2[0, bad, :, :8]).all() and not torch.isnan(q2[0, ~bad]).any()
        # offsets [B] past the end
        qb = torch.randn(2, 4, 2, 16)
        out, _ = run_native(qb, None, cos=cos, sin=sin, offsets=torch.tensor([0, 6]), inplace=False)
        assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, :2]).any()
        assert torch.isnan(out[1, 2:, :, :8]).all()
        # cu_seqlens with offsets past the end
        qp = torch.randn(7, 2, 16)
        out, _ = run_native(qp, None, cos=cos, sin=sin, cu_seqlens=torch.tensor([0, 3, 7]),
                            offsets=torch.tensor([0, 100]), inplace=False)  # fmt: skip
        assert not torch.isnan(out[:3]).any() and torch.isnan(out[3:, :, :8]).all()
        # an axis map pointing outside positions' axes, and positions outside the table
        am = torch.zeros(4, dtype=torch.long)
        am[3] = 5  # 2 axes only
        pos = torch.zeros(2, 1, 4, dtype=torch.long)
        out, _ = run_native(q, None, cos=cos, sin=sin, positions=pos, axis_map=am, inplace=False)
        assert torch.isnan(out[..., [3, 7]]).all() and not torch.isnan(out[..., [0, 1, 2, 4, 5, 6]]).any()
        pos[1, 0, 2] = 99
        out, _ = run_native(q, None, cos=cos, sin=sin, positions=pos, axis_map=torch.tensor([0, 1, 1, 0]),
                            inplace=False)  # fmt: skip
        assert torch.isnan(out[0, 2, :, [1, 2, 5, 6]]).all()
        assert not torch.isnan(out[0, 2, :, [0, 3, 4, 7]]).any() and not torch.isnan(out[0, [0, 1, 3]]).any()
        # an int offset needs no value read: refused even with value checks off (as by the Python check)
        with pytest.raises(ValueError, match=r"offsets=6 with seqlen 4 needs table rows \[6, 10\)"):
            run_native(q, None, cos=cos, sin=sin, offset=6, inplace=False)


def test_empty():
    cos, sin = tables(4, 8)
    for shape in [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8), (0, 2, 8), (3, 0, 8)]:
        q = torch.randn(shape)
        run_native(q, None, cos=cos, sin=sin, inplace=True)
        out, _ = run_native(q, None, cos=cos, sin=sin, inplace=False)
        assert out.shape == q.shape
    run_native(torch.randn(0, 2, 8), torch.randn(0, 1, 8), cos=cos, sin=sin, cu_seqlens=torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------
# Value checks: the Python check's exact messages (ValueError), before anything is written
# ---------------------------------------------------------------------------------------------


def _value_cases():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    q4, k4 = lambda: torch.randn(2, 3, 4, 16), lambda: torch.randn(2, 3, 2, 16)  # noqa: E731
    qp, kp = lambda: torch.randn(7, 4, 16), lambda: torch.randn(7, 2, 16)  # noqa: E731
    t = dict(cos=cos, sin=sin)
    yield "positions_above", q4, k4, dict(t, positions=torch.tensor([[0, 8, 1], [2, 3, 4]]))
    yield "positions_negative", q4, k4, dict(t, positions=torch.tensor([-1, 0, 1], dtype=torch.int32))
    yield "offsets_tensor", q4, k4, dict(t, offsets=torch.tensor([0, 6]))
    yield "offsets_negative", q4, k4, dict(t, offsets=torch.tensor([-2, 0]))
    yield "offset_int", q4, k4, dict(t, offset=6)
    yield "offset_negative", q4, k4, dict(t, offset=-1)
    yield "cu_not_zero", qp, kp, dict(t, cu_seqlens=torch.tensor([1, 3, 7]))
    yield "cu_decreasing", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 4, 2]))
    yield "cu_exceeds", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 3, 9]))
    yield "cu_rows", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 3, 7]), offsets=torch.tensor([0, 5]))
    yield "cu_offset_int", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 3, 7]), offset=6)
    yield "cu_on_the_fly", qp, kp, dict(inv_freq=inv, cu_seqlens=torch.tensor([0, 8]))
    empty_c, empty_s = cos[:0], sin[:0]
    yield "cu_padded_empty_table", qp, kp, dict(cos=empty_c, sin=empty_s, cu_seqlens=torch.tensor([0, 0]))
    am = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])  # 3 axes: 3 is outside
    pos3 = torch.zeros(3, 2, 3, dtype=torch.long)
    yield "axis_map_above", q4, k4, dict(t, positions=pos3, axis_map=am)
    yield "axis_map_negative", q4, k4, dict(inv_freq=inv, positions=pos3, axis_map=am - 1)
    big = pos3.clone()
    big[2, 1, 1] = 8
    yield "axis_positions", q4, k4, dict(t, positions=big, axis_map=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))


@pytest.mark.parametrize("inplace", [True, False], ids=["rope_", "rope"])
@pytest.mark.parametrize("case,make_q,make_k,kw", list(_value_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_value_check_messages(case, make_q, make_k, kw, inplace):
    """The C++ kernel refuses bad values with a ValueError whose message is the Python check's, character
    for character (so eager and compiled code, native and Python backends raise alike), and writes nothing."""
    q, k = make_q(), make_k()
    args = op_args(**kw)
    with pytest.raises(ValueError) as py:
        check_rope(q, k, *args, values=True, inplace=inplace)
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(ValueError) as cpp:
        (rope_ if inplace else rope)(q, k, *args)
    assert str(cpp.value) == str(py.value)
    assert torch.equal(q, q0) and torch.equal(k, k0), "an error must leave the inputs unchanged"


# ---------------------------------------------------------------------------------------------
# Bad input: the C++ kernel's memory-safety checks, naming the argument, nothing written
# ---------------------------------------------------------------------------------------------

_Q = lambda: torch.randn(2, 3, 4, 16)  # noqa: E731
_K = lambda: torch.randn(2, 3, 2, 16)  # noqa: E731


def _bad_cases():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    pos = torch.zeros(2, 3, dtype=torch.long)
    E, T, R = RuntimeError, TypeError, ValueError
    yield E, r"rope: q must be \[B, S, Hq, D\] or packed \[T, Hq, D\]", dict(q=torch.randn(4, 16))
    yield T, "rope: q must be float16/bfloat16/float32/float64", dict(q=torch.randint(0, 3, (2, 3, 4, 16)))
    yield E, r"rope: k must be \[B, S, Hk, D\] matching q", dict(k=torch.randn(2, 4, 2, 16))
    yield E, r"rope: k must be \[B, S, Hk, D\] matching q", dict(k=torch.randn(3, 2, 16))
    yield T, "rope: k must have q's dtype", dict(k=torch.randn(2, 3, 2, 16, dtype=torch.float64))
    yield E, "rope: pass either cos/sin tables or inv_freq", dict(inv_freq=inv)
    yield E, "rope: pass either cos/sin tables or inv_freq", dict(cos=None, sin=None)
    yield E, "rope: pass cos and sin together", dict(sin=None)
    yield E, "rope: cos and sin must have the same shape", dict(sin=sin[:, :4])
    yield T, "rope: cos and sin must have the same dtype", dict(sin=sin.double())
    yield T, "rope: cos must be a floating tensor", dict(cos=cos.int(), sin=sin.int())
    yield E, "exceeds head_dim D = 16", dict(cos=tables(8, 64)[0], sin=tables(8, 64)[1])
    yield E, "R/2 = 0", dict(cos=cos[:, :0], sin=sin[:, :0])
    yield E, r"rope: cos must be \[P, R/2\]", dict(cos=cos[0], sin=sin[0])
    yield E, r"rope: inv_freq must be \[R/2\]", dict(cos=None, sin=None, inv_freq=inv[None])
    yield T, "rope: exact=True needs float64 inv_freq", dict(cos=None, sin=None, inv_freq=inv, exact=True)
    yield E, "attention_factor and exact apply to on-the-fly angles", dict(exact=True)
    yield E, "attention_factor and exact apply to on-the-fly angles", dict(attention_factor=2.0)
    yield T, "rope: positions must be an integer tensor", dict(positions=torch.zeros(2, 3))
    yield E, r"rope: positions must be \[S\] = \[3\] or \[B, S\] = \[2, 3\]", dict(positions=torch.zeros(2, 4, dtype=torch.long))
    yield E, r"rope: offsets must be \[B\] = \[2\]", dict(offsets=torch.zeros(3, dtype=torch.long))
    yield T, "rope: offsets must be an integer tensor", dict(offsets=torch.zeros(2))
    yield E, "rope: pass positions or offsets, not both", dict(positions=pos, offsets=torch.zeros(2, dtype=torch.long))
    yield E, "rope: offset must be 0 when a positions or offsets tensor is given", dict(positions=pos, offset=3)
    yield E, "rope: offset must be 0 when a positions or offsets tensor is given", dict(offsets=torch.zeros(2, dtype=torch.long), offset=3)
    yield E, "rope: cu_seqlens needs packed q/k", dict(cu_seqlens=torch.tensor([0, 3]))
    # meta tables: the dispatcher picks the Meta kernel (the op's fake: the Python check)
    yield (E, R), "must be on|must be a CPU tensor", dict(cos=cos.to("meta"), sin=sin.to("meta"))
    # axis_map
    am = torch.zeros(8, dtype=torch.long)
    pos3 = torch.zeros(3, 2, 3, dtype=torch.long)
    yield E, r"rope: axis_map needs positions \[A, B, S\] or \[A, S\]", dict(axis_map=am)
    yield E, r"rope: axis_map must be \[R/2\] = \[8\]", dict(axis_map=am[:4], positions=pos3)
    yield T, "rope: axis_map must be an integer tensor", dict(axis_map=am.float(), positions=pos3)
    yield E, r"rope: with axis_map, positions must be \[A, S\] = \[A, 3\] or \[A, B, S\] = \[A, 2, 3\]", dict(axis_map=am, positions=pos3[:, :, :2])  # noqa: E501
    yield E, "rope: pass positions or offsets, not both", dict(axis_map=am, positions=pos3, offsets=torch.zeros(2, dtype=torch.long))  # noqa: E501


def _bad_packed_cases():
    cos, sin = tables(8, 16)
    E, T = RuntimeError, TypeError
    cu = torch.tensor([0, 3, 7])
    yield E, r"rope: k must be \[T, Hk, D\] matching q", dict(k=torch.randn(6, 2, 16))
    yield E, "rope: pass positions or cu_seqlens, not both", dict(cu_seqlens=cu, positions=torch.zeros(7, dtype=torch.long))
    yield E, "rope: axis_map cannot be combined with cu_seqlens", dict(cu_seqlens=cu, axis_map=torch.zeros(8, dtype=torch.long))
    yield T, "rope: cu_seqlens must be an integer tensor", dict(cu_seqlens=cu.float())
    yield E, r"rope: cu_seqlens must be \[N \+ 1\] with N >= 1", dict(cu_seqlens=torch.tensor([0]))
    yield E, r"rope: cu_seqlens must be \[N \+ 1\] with N >= 1", dict(cu_seqlens=cu[None])
    yield E, r"rope: offsets must be \[N\] = \[2\] \(one per sequence\)", dict(cu_seqlens=cu, offsets=torch.zeros(3, dtype=torch.long))  # noqa: E501
    yield E, "rope: offset must be 0 when a positions or offsets tensor is given", dict(cu_seqlens=cu, offsets=torch.zeros(2, dtype=torch.long), offset=1)  # noqa: E501


_BAD = [(False,) + c for c in _bad_cases()] + [(True,) + c for c in _bad_packed_cases()]


@pytest.mark.parametrize("inplace", [True, False], ids=["rope_", "rope"])
@pytest.mark.parametrize("packed,exc,match,override", _BAD, ids=[f"{'packed-' if c[0] else ''}{c[2]}" for c in _BAD])
def test_bad_input(packed, exc, match, override, inplace):
    cos, sin = tables(8, 16)
    if packed:
        args = dict(q=torch.randn(7, 4, 16), k=torch.randn(7, 2, 16), cos=cos, sin=sin)
    else:
        args = dict(q=_Q(), k=_K(), cos=cos, sin=sin)
    args.update(override)
    q, k = args.pop("q"), args.pop("k")
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(exc, match=match):
        (rope_ if inplace else rope)(q, k, *op_args(**args))
    assert torch.equal(q, q0) and torch.equal(k, k0), "an error must leave the inputs unchanged"


def test_non_unit_channel_stride_is_accepted():
    """Formerly refused (stride(-1) == 1): any channel stride now runs, on the scalar strided path."""
    cos, sin = tables(8, 16)
    q = torch.randn(2, 3, 4, 32)[..., ::2]
    check(q, None, cos, sin, inplace=True)
    check(q, None, cos, sin, inplace=False)


def test_aliasing_and_ignored_arguments_are_errors():
    """The ops check aliasing from metadata before writing: q and k written in place never overlap each
    other, never overlap internally; the out-of-place op's outputs are fresh."""
    cos, sin = tables(8, 16)
    q = torch.randn(1, 4, 4, 16)
    q0 = q.clone()
    with pytest.raises(RuntimeError, match="must not overlap"):
        rope_(q, q, *op_args(cos, sin))  # k is q: every head would be rotated twice
    buf = torch.randn(1, 9, 4, 16)
    buf0 = buf.clone()
    with pytest.raises(RuntimeError, match="must not overlap"):
        rope_(buf[:, :8], buf[:, 1:9], *op_args(cos, sin))  # k is q shifted by one token
    assert torch.equal(buf, buf0)
    with pytest.raises(RuntimeError, match="internally overlapping"):
        rope_(torch.empty(1, 1, 1, 16).expand(1, 2, 3, 16), None, *op_args(cos, sin))
    with pytest.raises(RuntimeError, match="attention_factor and exact apply to on-the-fly angles"):
        rope_(q, None, *op_args(cos, sin, attention_factor=2.0))
    with pytest.raises(RuntimeError, match="offset must be 0"):
        rope_(q, None, *op_args(cos, sin, offsets=torch.zeros(1, dtype=torch.long), offset=3))
    assert torch.equal(q, q0), "an error must leave q unchanged"
    # Out of place reads overlapping q and k (and an expanded q) fine: it writes fresh tensors only.
    qo, ko = rope(q, q, *op_args(cos, sin))
    assert qo.data_ptr() not in (q.data_ptr(), ko.data_ptr()) and torch.equal(qo, ko)
    qe = torch.randn(1, 1, 1, 16).expand(1, 2, 3, 16)
    qo, _ = rope(qe, None, *op_args(cos, sin))
    want, _ = rope(qe.contiguous(), None, *op_args(cos, sin))
    assert torch.equal(qo, want)
    # Accepted: in place on head slices of one fused buffer (disjoint q and k).
    qkv = torch.randn(1, 4, 8, 16)
    want_q, want_k = pk.apply_rope(qkv[:, :, :4], qkv[:, :, 4:6], cos[:4], sin[:4])
    rope_(qkv[:, :, :4], qkv[:, :, 4:6], *op_args(cos, sin))
    assert max_err(qkv[:, :, :4], want_q) < 1e-6 and max_err(qkv[:, :, 4:6], want_k) < 1e-6


def test_overlapping_head_slices_are_refused():
    """k made of heads of q (or q and k sharing a head of one qkv buffer): the shared heads would be rotated
    twice. The op layer's Python check refuses these (ValueError); the C++ kernel must too."""
    cos, sin = tables(8, 16)
    q = torch.randn(1, 4, 4, 16)
    with pytest.raises((RuntimeError, ValueError), match="must not overlap"):
        rope_(q, q[:, :, :2], *op_args(cos, sin))
    qkv = torch.randn(1, 4, 8, 16)
    with pytest.raises((RuntimeError, ValueError), match="must not overlap"):
        rope_(qkv[:, :, :4], qkv[:, :, 3:5], *op_args(cos, sin))


def test_inference_tensors():
    """Writing an inference tensor in place outside inference mode raises (PyTorch's rule, checked by the
    kernel before writing); inside inference mode it runs; out of place is fine anywhere."""
    cos, sin = tables(8, 16)
    with torch.inference_mode():
        qi, ki = _Q(), _K()
    q0, k0 = qi.clone(), ki.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        rope_(qi, None, *op_args(cos, sin))
    with pytest.raises(RuntimeError, match=r"Inplace update to inference tensor outside InferenceMode.*\bk\b"):
        rope_(q0.clone(), ki, *op_args(cos, sin))  # only k is an inference tensor
    assert torch.equal(qi, q0) and torch.equal(ki, k0)
    want_q, want_k = rope(q0, k0, *op_args(cos, sin))
    got_q, got_k = rope(qi, ki, *op_args(cos, sin))  # out of place, outside inference mode
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    with torch.inference_mode():
        rope_(qi, ki, *op_args(cos, sin))  # normal cos/sin, inference q/k
        qn = q0.clone()
        rope_(qn, None, *op_args(cos, sin))  # a normal tensor in inference mode
    assert torch.equal(qi, want_q) and torch.equal(ki, want_k) and torch.equal(qn, want_q)


@pytest.mark.parametrize("router", [False, True], ids=["default_native", "use_backend"])
def test_version_counter(router):
    """Each in-place call bumps the version counter of each tensor it writes exactly once (the C++
    ADInplaceOrView kernel); the out-of-place op bumps none."""
    cos, sin = tables(8, 16)
    q, k = _Q(), _K()
    with pk.use_backend("native") if router else contextlib.nullcontext():
        vq, vk = q._version, k._version
        rope_(q, k, *op_args(cos, sin))
        assert (q._version, k._version) == (vq + 1, vk + 1)
        rope_(q, None, *op_args(cos, sin))
        assert (q._version, k._version) == (vq + 2, vk + 1)
        rope(q, k, *op_args(cos, sin))
        assert (q._version, k._version) == (vq + 2, vk + 1)
        pk.apply_rope_(q, k, cos, sin)
        assert (q._version, k._version) == (vq + 3, vk + 2)
        with pytest.raises(ValueError):
            rope_(q, k, *op_args(cos, sin, offset=7))  # an error before writing: no bump
        assert (q._version, k._version) == (vq + 3, vk + 2)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck (schema, fake/meta kernel, aliasing) on the public ops with the native kernel
# ---------------------------------------------------------------------------------------------


def test_opcheck():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    q, k = _Q(), _K()
    pos = torch.randint(0, 8, (2, 3))
    qp, kp = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    am = pk.mrope_axis_map([2, 3, 3])
    pos3 = torch.randint(0, 8, (3, 2, 3))
    cases = [
        (q, k, *op_args(cos, sin, offset=2)),
        (q, k, *op_args(cos, sin, positions=pos, interleaved=True, conjugate=True)),
        (q, None, *op_args(inv_freq=inv, offsets=torch.tensor([1, 4]), attention_factor=2.0)),
        (q.double(), None, *op_args(inv_freq=inv.double(), positions=pos, exact=True)),
        (qp, kp, *op_args(cos, sin, cu_seqlens=cu, offsets=torch.tensor([0, 1]))),
        (q, k, *op_args(cos, sin, positions=pos3, axis_map=am)),
        (torch.randn(2, 3, 4, 32)[..., ::2], None, *op_args(cos, sin)),
    ]
    for args in cases:
        torch.library.opcheck(rope_, args)
        torch.library.opcheck(rope, args)


# ---------------------------------------------------------------------------------------------
# ISA variants: the same results from the baseline, AVX2 and AVX512 builds
# ---------------------------------------------------------------------------------------------

# Inputs come from the parent (torch's own randn/cos depend on the CPU capability too). The child calls the
# public ops with the native kernel registered for CPU (default "auto" without TRITON_INTERPRET, forced
# "native" here all the same), and checks it is that kernel.
_VARIANT_SCRIPT = textwrap.dedent(
    """
    import torch
    import posenc_kernels as pk
    from posenc_kernels.ops import registry
    pk.set_backend("native")
    assert registry.registered_kernels("rope")["CPU"] == "native", registry.registered_kernels("rope")
    assert registry.registered_kernels("rope_")["CPU"] == "native", registry.registered_kernels("rope_")
    outs = []
    for q, k, cos, sin, inv, inter in torch.load(IN):
        tail = (None, None, None, 2, None, None, 1.0, inter, False, False)
        qo, ko = torch.ops.posenc.rope.default(q, k, cos, sin, *tail)
        q2, k2 = q.clone(), k.clone()
        torch.ops.posenc.rope_.default(q2, k2, cos, sin, *tail)  # in place: the vector path
        qs = torch.empty(q.shape[:-1] + (2 * q.shape[-1],), dtype=q.dtype)[..., ::2].copy_(q)
        torch.ops.posenc.rope_.default(qs, None, cos, sin, *tail)  # channel stride 2: the scalar path
        qf, _ = torch.ops.posenc.rope.default(q, None, None, None, inv, None, None, 2, None, None, 1.5, inter,
                                              False, False)  # on-the-fly angles
        outs += [qo, ko, q2, k2, qs, qf]
    torch.save(outs, OUT)
    """
)


@pytest.mark.parametrize("variant", ["default", "avx2"])
def test_isa_variants_agree(variant, tmp_path):
    """ATEN_CPU_CAPABILITY forces a narrower build: every variant computes bit-for-bit the values of the
    one this machine picks (the build disables FMA contraction, conversions round to nearest even)."""
    if variant == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2 here")
    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for inter in (False, True):
            q, k = torch.randn(2, 5, 3, 80).to(dt), torch.randn(2, 5, 1, 80).to(dt)
            inv = torch.rand(36)
            cases.append((q, k, torch.randn(8, 36), torch.randn(8, 36), inv, inter))  # D 80, R 72: vector tails
    torch.save(cases, tmp_path / "in.pt")
    outs = {}
    for cap in (variant, None):
        out = tmp_path / f"{cap}.pt"
        env = dict(os.environ, **({"ATEN_CPU_CAPABILITY": cap} if cap else {}))
        env.pop("TRITON_INTERPRET", None)
        script = f"IN, OUT = {str(tmp_path / 'in.pt')!r}, {str(out)!r}\n" + _VARIANT_SCRIPT
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
        outs[cap] = torch.load(out)
    assert len(outs[variant]) == 6 * 8
    for a, b in zip(outs[variant], outs[None]):
        assert torch.equal(a, b)
    # and the in-place / strided results are those of the out-of-place op
    o = outs[None]
    for i in range(0, len(o), 6):
        assert torch.equal(o[i], o[i + 2]) and torch.equal(o[i + 1], o[i + 3]) and torch.equal(o[i], o[i + 4])


def test_wider_isa_code_stays_in_its_variants():
    """Every instruction needing more than baseline x86-64 (VEX/EVEX encodings, BMI) lies in a function of
    the AVX2/AVX512 variants: the linker kept the baseline copy of every inline function shared with them,
    so the DEFAULT path cannot fault on an older CPU."""
    import platform
    import re
    import shutil

    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    ours = re.compile(r"(posenc_native_[0-9a-f]+|/posenc_kernels/_C\.[^/]*)\.so$")  # JIT or AOT build
    libs = [p for p in torch.ops.loaded_libraries if ours.search(p)]
    assert libs, torch.ops.loaded_libraries
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", libs[0]], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    wide = re.compile(r"^\s*[0-9a-f]+:\t(v[a-z0-9]+|kmov[a-z]*|shlx|sarx|shrx|andn|tzcnt|lzcnt)\s")
    fn, offenders, n_variant = None, set(), 0
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        if wide.match(line):
            if "AVX2::" in fn or "AVX512::" in fn:
                n_variant += 1
            else:
                offenders.add(fn)
    assert not offenders, sorted(offenders)[:5]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert n_variant > 0, "the AVX2/AVX512 variants were not built"


# ---------------------------------------------------------------------------------------------
# The public API on the native backend: values, gradients, compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_apply_rope_native_backend(native_backend, no_python_kernels, dtype, interleaved):
    q, k = make(2, 6, 4, 2, 48, dtype, hf_layout=True)
    cos, sin = tables(10, 32)
    offsets = torch.tensor([0, 4])
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    out_q, out_k = pk.apply_rope(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    assert_dtype_tolerance(out_q, truth_q, eager_q, what="apply_rope q")
    assert_dtype_tolerance(out_k, truth_k, eager_k, what="apply_rope k")
    q2, k2 = pk.apply_rope_(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    assert q2 is q and torch.equal(q, out_q) and torch.equal(k, out_k)


def test_public_api_packed_and_axis_map(native_backend, no_python_kernels):
    """cu_seqlens and axis_map through the public functions reach the C++ kernel."""
    cos, sin = tables(40, 64)
    qp = torch.randn(9, 2, 64)
    cu, offsets = torch.tensor([0, 4, 9]), torch.tensor([3, 20])
    want, _ = rope(qp, None, *op_args(cos, sin, cu_seqlens=cu, offsets=offsets))
    got, _ = pk.apply_rope(qp, None, cos, sin, cu_seqlens=cu, offsets=offsets)
    assert torch.equal(got, want)
    q = torch.randn(2, 5, 2, 64)
    am = pk.mrope_axis_map([8, 12, 12])
    pos = torch.randint(0, 40, (3, 2, 5))
    want, _ = rope(q, None, *op_args(cos, sin, positions=pos, axis_map=am))
    got, _ = pk.apply_rope_(q.clone(), None, cos, sin, positions=pos, axis_map=am)
    assert torch.equal(got, want)


def test_public_api_errors_are_the_python_messages(native_backend):
    """The public functions re-raise a native refusal with the op layer's own message."""
    cos, sin = tables(8, 16)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        pk.apply_rope_(_Q(), None, cos, sin, positions=torch.tensor([0, 1, 8]))
    with pytest.raises(ValueError, match="k must not overlap q"):
        q = _Q()
        pk.apply_rope_(q, q, cos, sin)


def test_gradients_native_backend(native_backend):
    q, k = make(2, 5, 4, 2, 32, torch.float32)
    cos, sin = tables(8, 24)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    go_q, go_k = torch.randn_like(q), torch.randn_like(k)
    qa, ka = qr * 1.0, kr * 1.0  # non-leaf: in place is allowed
    pk.apply_rope_(qa, ka, cos, sin, offsets=2)
    torch.autograd.backward((qa, ka), (go_q, go_k))
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    tq, tk = ref.rope_reference(q64, k64, cos, sin, offsets=2)
    torch.autograd.backward((tq, tk), (go_q.double(), go_k.double()))
    assert max_err(qr.grad, q64.grad) < 1e-5 and max_err(kr.grad, k64.grad) < 1e-5
    qr.grad = kr.grad = None
    oq, ok = pk.apply_rope(qr, kr, cos, sin, offsets=2)
    torch.autograd.backward((oq, ok), (go_q, go_k))
    assert max_err(qr.grad, q64.grad) < 1e-5 and max_err(kr.grad, k64.grad) < 1e-5
    qd = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    c64, s64 = tables(3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope(x, None, c64, s64)[0], (qd,))
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope_(x * 1.0, None, c64, s64)[0], (qd,))
    qp = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 5])
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope(x, None, c64, s64, cu_seqlens=cu)[0], (qp,))


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_native_backend(native_backend, dynamic):
    q, k = make(1, 7, 4, 2, 32, torch.float32)
    cos, sin = tables(7, 32)

    def f(q, k):
        q = q * 2.0
        k = k + 1.0
        pk.apply_rope_(q, k, cos, sin)
        return q, k

    want = f(q, k)
    got = torch.compile(f, fullgraph=True, dynamic=dynamic)(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# Sinusoidal and learned: the public functions on the native backend against the float64 references
# ---------------------------------------------------------------------------------------------

PORTED = "add_sinusoidal_" in registry._OPS
needs_port = pytest.mark.skipif(
    not PORTED,
    reason="the sinusoidal/learned ops are not defined on the op layer yet (posenc::add_sinusoidal_ is not in "
    "posenc_kernels.ops.registry._OPS): their port is pending",
)


def _offsets_kw(fn, value):
    """The position-start keyword of a reference function (``offsets=``, or ``offset=`` before the rename)."""
    return {"offsets": value} if "offsets" in inspect.signature(fn).parameters else {"offset": value}


@needs_port
def test_sinusoidal_learned_kernels_are_native():
    for name in ("sinusoidal_table", "add_sinusoidal_", "add_sinusoidal", "concat_sinusoidal",
                 "add_position_embedding_", "add_position_embedding"):  # fmt: skip
        assert name in _native.ops_for("CPU"), name
        assert_native(name)


@needs_port
@pytest.mark.parametrize("dim", [1, 7, 64, 130])
@pytest.mark.parametrize("interleaved,cos_first", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sinusoidal_table_native(native_backend, no_python_kernels, dim, interleaved, cos_first, dtype):
    conv = dict(interleaved=interleaved, cos_first=cos_first, freq_shift=1.0 if dim >= 4 else 0.0, scale=1.5)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    for pos, arg in ((torch.arange(300), 300), (torch.rand(3, 50) * 1000, None)):
        arg = pos if arg is None else arg
        table = pk.sinusoidal_table(arg, dim, dtype=dtype, **conv)
        assert table.shape == pos.shape + (dim,) and table.dtype == dtype
        truth = ref.sinusoidal_table_reference(pos.to(math), dim, **conv)
        same_in_torch = ref.sinusoidal_table_reference(pos.to(math), dim, dtype=math, **conv).to(dtype)
        if dtype == torch.float64:  # torch in fp64 *is* the truth here: allow fp64 sin/cos's last-bit differences
            assert max_err(table, truth) < 1e-12
        else:
            assert_dtype_tolerance(table, truth, same_in_torch, what="table")
        if dim % 2:
            assert torch.equal(table[..., -1], torch.zeros_like(table[..., -1]))


def _sin_positions(mode, B, S):
    if mode == "offset":
        return {}, 5
    if mode == "offsets":
        return {}, torch.tensor([0, 7, 100][:B])
    if mode == "positions_int":
        return {"positions": torch.randint(0, 1000, (B, S) if B > 1 else (S,))}, 0
    return {"positions": torch.rand(S) * 50}, 0  # float positions (diffusion timesteps)


@needs_port
@pytest.mark.parametrize("layout", ["bsd", "transposed", "td"])
@pytest.mark.parametrize("mode", ["offset", "offsets", "positions_int", "positions_float"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_add_sinusoidal_native(native_backend, no_python_kernels, mode, inplace, dtype, layout):
    B, S, D = 3, 11, 48
    if layout == "td":
        if mode == "offsets":
            pytest.skip("[T, D] input: one sequence, no per-sequence offsets")
        B = 1
    kw, offsets = _sin_positions(mode, B, S)
    if layout == "transposed":
        x = torch.randn(S, B, D, dtype=dtype).transpose(0, 1)
    else:
        x = torch.randn(B, S, D, dtype=dtype)
    if layout == "td":
        x = x[0]
    truth = ref.add_sinusoidal_reference(x, x_scale=2.0, **kw, **_offsets_kw(ref.add_sinusoidal_reference, offsets))
    same_in_torch = ref.add_sinusoidal_reference(x, x_scale=2.0, dtype=dtype, **kw,
                                                 **_offsets_kw(ref.add_sinusoidal_reference, offsets)).to(dtype)
    x0 = x.clone()
    v = x._version
    with nan_poisoned_allocations():
        if inplace:
            out = pk.add_sinusoidal_(x, x_scale=2.0, offsets=offsets, **kw)
        else:
            out = pk.add_sinusoidal(x, x_scale=2.0, offsets=offsets, **kw)
    if inplace:
        assert out is x and x._version == v + 1
    else:
        assert torch.equal(x, x0) and x._version == v
    if dtype == torch.float64:
        assert max_err(out, truth) < 1e-11
    else:
        assert_dtype_tolerance(out, truth, same_in_torch, what=mode)


@needs_port
@pytest.mark.parametrize("mode", ["offset", "offsets", "positions_int", "positions_float"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_concat_sinusoidal_native(native_backend, no_python_kernels, mode, dtype):
    B, S, D, P = 3, 9, 20, 33
    kw, offsets = _sin_positions(mode, B, S)
    x = torch.randn(B, S, D, dtype=dtype)
    conv = dict(interleaved=False, cos_first=True, freq_shift=1.0)
    okw = _offsets_kw(ref.concat_sinusoidal_reference, offsets)
    truth = ref.concat_sinusoidal_reference(x, P, **kw, **okw, **conv)
    same_in_torch = ref.concat_sinusoidal_reference(x, P, dtype=dtype, **kw, **okw, **conv).to(dtype)
    with nan_poisoned_allocations():
        out = pk.concat_sinusoidal(x, P, offsets=offsets, **kw, **conv)
    assert out.shape == (B, S, D + P)
    assert torch.equal(out[..., :D], x)
    if dtype == torch.float64:
        assert max_err(out, truth) < 1e-11
    else:
        assert_dtype_tolerance(out, truth, same_in_torch, what=mode)


@needs_port
def test_sinusoidal_errors_and_opcheck(native_backend):
    x = torch.randn(2, 3, 8)
    with pytest.raises((RuntimeError, ValueError), match="internally overlapping"):
        pk.add_sinusoidal_(torch.randn(1, 1, 8).expand(2, 3, 8))
    with pytest.raises((RuntimeError, ValueError), match="positions or offsets, not both"):
        pk.add_sinusoidal(x, positions=torch.zeros(3), offsets=torch.zeros(2, dtype=torch.long))
    with torch.inference_mode():
        xi = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="inference tensor"):
        pk.add_sinusoidal_(xi)
    ops = torch.ops.posenc
    conv = (10000.0, True, False, 0.0, 1.0)
    torch.library.opcheck(ops.add_sinusoidal_.default, (x, None, torch.tensor([1, 2]), 0, 2.0, *conv))
    torch.library.opcheck(ops.add_sinusoidal.default, (x, torch.rand(2, 3), None, 0, 1.0, *conv))
    torch.library.opcheck(ops.add_sinusoidal.default, (x[0], None, None, 3, 1.0, 10000.0, False, True, 1.0, 0.5))
    torch.library.opcheck(ops.concat_sinusoidal.default, (x, None, None, 2, 6, *conv))
    torch.library.opcheck(ops.sinusoidal_table.default,
                          (torch.arange(5), 0, 8, *conv, torch.float32, torch.device("cpu")))  # fmt: skip


@needs_port
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("pos_shape", ["BS", "S", "TD"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_add_position_embedding_native(native_backend, no_python_kernels, dtype, inplace, pos_shape, table_dtype):
    """x + table[positions] (the learned table of any float dtype, fp32 math) against float64."""
    B, S, D, P = 2, 7, 40, 16
    table = torch.randn(P, D, dtype=table_dtype)
    if pos_shape == "TD":
        x, positions = torch.randn(S, D, dtype=dtype), torch.randint(0, P, (S,))
    else:
        x = torch.randn(S, B, D, dtype=dtype).transpose(0, 1)  # strided [B, S, D]
        positions = torch.randint(0, P, (B, S) if pos_shape == "BS" else (S,))
    truth = x.double() + table.double()[positions]
    same_in_torch = x + table[positions].to(dtype)
    x0 = x.clone()
    v = x._version
    with nan_poisoned_allocations():
        if inplace:
            out = pk.add_position_embedding_(x, table, positions)
        else:
            out = pk.add_position_embedding(x, table, positions)
    if inplace:
        assert out is x and x._version == v + 1
    else:
        assert torch.equal(x, x0)
    if dtype == torch.float64 and table_dtype == torch.float64:
        assert max_err(out, truth) < 1e-12
    else:
        assert_dtype_tolerance(out, truth, same_in_torch.to(dtype), what="learned")


@needs_port
def test_add_position_embedding_rows_outside_table(native_backend):
    x, table = torch.randn(1, 4, 8), torch.randn(6, 8)
    positions = torch.tensor([0, 6, -1, 5])
    x0 = x.clone()
    with pytest.raises(ValueError):
        pk.add_position_embedding_(x, table, positions)
    assert torch.equal(x, x0)
    with value_checks_off():
        out = torch.ops.posenc.add_position_embedding.default(x, table, positions, None, False)
    bad = torch.tensor([False, True, True, False])
    assert torch.isnan(out[0, bad]).all() and not torch.isnan(out[0, ~bad]).any()
    torch.library.opcheck(torch.ops.posenc.add_position_embedding_.default, (x, table, torch.tensor([0, 1, 2, 3]), None))
    torch.library.opcheck(torch.ops.posenc.add_position_embedding.default,
                          (x, table, torch.tensor([[0, 1, 2, 3]]), 0, True))  # fmt: skip
