"""The CUDA C++ kernels (csrc/rope_cuda.cu, csrc/sinusoidal_cuda.cu) against the float64 references.

These need a GPU and run in benchmarks/gpu_check.sh on a CUDA machine (the extension is built there first);
without CUDA every test here is skipped, and CI covers the same sources with the compile-only check
(scripts/check_cuda_compile, run by .ci/run). The extension registers its kernels straight for the public
ops' CUDA key (``_native_register``, csrc/bindings.cpp) when the backend is native: the tests call the public
ops ``posenc::rope_`` (in place) / ``posenc::rope`` (out of place) to reach every mode - tables, on-the-fly
and exact angles, attention factor, packed varlen (cu_seqlens), multi-axis positions (axis_map) - after
checking that the C++ kernel is the one registered, then once more through the public API under
``use_backend("native")``. The CUDA kernels read no values (graph capturable): rows outside the table give
NaN; the value checks are the Python side's. A non-unit channel stride is refused on CUDA (the CPU kernel
has a strided path).
"""

import math

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.ops import registry
from posenc_kernels.ops.angles import exact_angles as _exact_angles

from conftest import assert_dtype_tolerance
from positions_oracle import cu_positions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu_check.sh)")

from native_cuda_common import *  # noqa: F401,F403  (the shared helpers: native_cuda_common.__all__)

def _rows(B, S, positions, offsets, offset):
    if positions is not None:
        return positions.to(torch.int64).expand(B, S)
    s = torch.arange(S, device=DEV)
    if offsets is not None:
        return offsets.to(torch.int64)[:, None] + s
    return (s + offset).expand(B, S)


def _args(cos=None, sin=None, inv_freq=None, positions=None, offsets=None, offset=0, cu_seqlens=None, axis_map=None,
          af=1.0, interleaved=False, conjugate=False, exact=False):  # fmt: skip
    """The ops' arguments after q and k, in schema order."""
    return (cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, float(af), interleaved, conjugate,
            exact)  # fmt: skip


def _native_rope(q, k, cos=None, sin=None, *, inplace=False, **kw):
    """rope_ (in place: q, k themselves, each version counter bumped once) or rope (out of place, outputs
    NaN-poisoned at allocation)."""
    if inplace:
        v = q._version if not q.is_inference() else None
        rope_(q, k, *_args(cos, sin, **kw))
        if v is not None:
            assert q._version == v + 1
        return q, k
    with nan_poisoned_allocations():
        qo, ko = rope(q, k, *_args(cos, sin, **kw))
    return qo, (ko if k is not None else None)


def _eager(x, cos, sin, rows, interleaved, conjugate):
    """The same computation by torch in x's dtype (HF style), the baseline of the tolerance rule."""
    s = -sin if conjugate else sin
    out, _ = ref.rope_hf_eager(x, None, cos, s, positions=rows, interleaved=interleaved)
    return out


def _check_rope(out, x, cos, sin, rows, interleaved, conjugate, what):
    truth = ref.rotate_reference(x, cos, sin, rows, interleaved=interleaved, conjugate=conjugate)
    assert_dtype_tolerance(out, truth, _eager(x, cos, sin, rows, interleaved, conjugate), what=what)


def _qk(B, S, Hq, Hk, D, dtype, layout="bshd"):
    if layout == "bhsd":  # HF's [B, H, S, D], passed transposed without a copy
        q = torch.randn(B, Hq, S, D, device=DEV, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hk, S, D, device=DEV, dtype=dtype).transpose(1, 2)
    elif layout == "misaligned":  # storage offset of one element and odd head strides: the scalar path
        q = torch.randn(B, S, Hq, D + 1, device=DEV, dtype=dtype)[..., 1:]
        k = torch.randn(B, S, Hk, D + 1, device=DEV, dtype=dtype)[..., 1:]
    else:
        q = torch.randn(B, S, Hq, D, device=DEV, dtype=dtype)
        k = torch.randn(B, S, Hk, D, device=DEV, dtype=dtype)
    return q, k


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "misaligned"])
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_tables(dtype, interleaved, layout, inplace):
    B, S, Hq, Hk, D = 2, 13, 8, 2, 128
    q, k = _qk(B, S, Hq, Hk, D, dtype, layout)
    cos, sin = pk.rope_cos_sin(64, pk.rope_frequencies(D)[0].to(DEV))
    positions = torch.randint(0, 64, (B, S), device=DEV)
    q0, k0 = q.clone(), k.clone()
    qo, ko = _native_rope(q, k, cos, sin, positions=positions, interleaved=interleaved, inplace=inplace)
    assert (qo is q) == inplace
    for out, x, name in ((qo, q0, "q"), (ko, k0, "k")):
        _check_rope(out, x, cos, sin, positions, interleaved, False, f"{name} {dtype} {layout}")
    if not inplace:
        assert torch.equal(q, q0) and torch.equal(k, k0), "out of place must leave the inputs untouched"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape", [(1, 1, 32, 8, 128), (3, 7, 28, 4, 128), (2, 5, 4, 1, 64), (1, 9, 3, 3, 80), (2, 4, 2, 2, 256)]
)
@pytest.mark.parametrize("rows", ["offset", "offsets", "positions_s", "positions_int32"])
def test_rope_shapes_and_rows(dtype, shape, rows):
    B, S, Hq, Hk, D = shape
    q, k = _qk(B, S, Hq, Hk, D, dtype)
    cos, sin = pk.rope_cos_sin(40, pk.rope_frequencies(D)[0].to(DEV))
    kw = dict(positions=None, offsets=None, offset=0)
    if rows == "offset":
        kw["offset"] = 7
    elif rows == "offsets":
        kw["offsets"] = torch.randint(0, 40 - S, (B,), device=DEV, dtype=torch.int32)
    elif rows == "positions_s":
        kw["positions"] = torch.randint(0, 40, (S,), device=DEV)
    else:
        kw["positions"] = torch.randint(0, 40, (B, 2 * S), device=DEV, dtype=torch.int32)[:, ::2]  # strided
    r = _rows(B, S, **kw)
    qo, ko = _native_rope(q, k, cos, sin, **kw)
    _check_rope(qo, q, cos, sin, r, False, False, f"q {shape} {rows}")
    _check_rope(ko, k, cos, sin, r, False, False, f"k {shape} {rows}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_partial_conjugate_no_k(dtype, interleaved, inplace):
    B, S, H, D, R = 2, 6, 4, 96, 32
    q = torch.randn(B, S, H, D, device=DEV, dtype=dtype)
    cos, sin = pk.rope_cos_sin(S, pk.rope_frequencies(R)[0].to(DEV))
    q0 = q.clone()
    qo, _ = _native_rope(q, None, cos, sin, interleaved=interleaved, conjugate=True, inplace=inplace)
    _check_rope(qo, q0, cos, sin, _rows(B, S, None, None, 0), interleaved, True, "partial conjugate")
    assert torch.equal(qo[..., R:], q0[..., R:]), "pass-through channels must be bit-identical"


def test_rope_conjugate_inverts():
    q, k = _qk(2, 9, 4, 2, 64, torch.float64)
    # float64 tables with cos^2 + sin^2 = 1 to float64 rounding (pk.rope_cos_sin's angles are fp32)
    cos, sin = ref.rope_cos_sin_reference(torch.arange(9, device=DEV), ref.rope_frequencies_reference(64).to(DEV))
    qo, ko = _native_rope(q, k, cos, sin)
    qb, kb = _native_rope(qo, ko, cos, sin, conjugate=True)
    torch.testing.assert_close(qb, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kb, k, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("af", [1.0, 0.75])
def test_rope_on_the_fly_matches_hf_numerics(dtype, interleaved, af):
    """Default angles: fp32(pos) * fp32(inv_freq), one fp32 product (HF), precise sincos, * attention_factor."""
    B, S, Hq, Hk, D = 2, 11, 4, 2, 128
    q, k = _qk(B, S, Hq, Hk, D, dtype)
    inv = pk.rope_frequencies(D, 500000.0)[0].to(DEV, torch.float32)
    positions = torch.randint(0, 8192, (B, S), device=DEV)
    qo, ko = _native_rope(q, k, inv_freq=inv, positions=positions, af=af, interleaved=interleaved)
    # truth: the same fp32 angles, cos/sin in float64; baseline: fp32 tables (rope_cos_sin) in the dtype
    angle = positions.reshape(-1).float()[:, None] * inv[None, :]
    cos64, sin64 = angle.double().cos() * af, angle.double().sin() * af
    cos32, sin32 = pk.rope_cos_sin(positions.reshape(-1), inv, attention_factor=af)
    rows = torch.arange(B * S, device=DEV).view(B, S)
    for out, x in ((qo, q), (ko, k)):
        truth = ref.rotate_reference(x, cos64, sin64, rows, interleaved=interleaved)
        assert_dtype_tolerance(out, truth, _eager(x, cos32, sin32, rows, interleaved, False), what="on the fly")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_exact_angles_far_positions(dtype):
    """exact=True: the angle in double, reduced mod 2*pi in double, then fp32 cos/sin of the reduced angle
    (for every storage type, float64 included: the Triton and torch paths' numerics): accurate at positions
    ~1e6, where an fp32 angle is off by up to ~0.03 rad."""
    B, S, H, D = 1, 16, 2, 64
    q = torch.randn(B, S, H, D, device=DEV, dtype=dtype)
    inv = ref.rope_frequencies_reference(D, 10000.0).to(DEV)  # float64
    positions = torch.randint(900_000, 1_000_000, (B, S), device=DEV)
    qo, _ = _native_rope(q, None, inv_freq=inv, positions=positions, exact=True)
    cos64, sin64 = ref.rope_cos_sin_reference(positions.reshape(-1), inv)
    rows = torch.arange(B * S, device=DEV).view(B, S)
    truth = ref.rotate_reference(q, cos64, sin64, rows)
    # the same computation by torch: the torch path's fp32 reduced angle, fp32 cos/sin, then HF eager in the
    # dtype (float64 too: the fp32 cos/sin widened, as the spec has it)
    r = _exact_angles(positions.reshape(-1)[:, None], inv[None, :])
    assert r.dtype == torch.float32
    base = _eager(q, r.cos(), r.sin(), rows, False, False)
    assert_dtype_tolerance(qo, truth, base, what="exact")
    # and the default (fp32 angle) path is measurably worse there, so the test can tell them apart
    qf, _ = _native_rope(q, None, inv_freq=inv.float(), positions=positions)
    assert (qf.double() - truth).abs().max() > 10 * (qo.double() - truth).abs().max()


@pytest.mark.parametrize("af", [1.0, 0.7])
def test_rope_exact_float64_uses_fp32_sincos(af):
    """float64 q/k with exact=True: fp32 cos/sin of the fp32 reduced angle, times attention_factor in fp32,
    widened to float64 - the spec (rope.py _angles_torch / _rope_kernel), not a float64 sincos. Rebuilt here
    from the torch path's own _exact_angles, the kernel's result matches to float64 rounding in nearly every
    element; a float64 sincos (or a float64 attention_factor product) differs by ~1e-8 in nearly all."""
    B, S, Hq, Hk, D = 2, 16, 4, 2, 128
    q, k = _qk(B, S, Hq, Hk, D, torch.float64)
    inv = ref.rope_frequencies_reference(D, 10000.0).to(DEV)
    positions = torch.randint(0, 1_000_000, (B, S), device=DEV)
    qo, ko = _native_rope(q, k, inv_freq=inv, positions=positions, af=af, exact=True)
    r = _exact_angles(positions.reshape(-1)[:, None], inv[None, :])
    cos, sin = (r.cos() * af).double(), (r.sin() * af).double()  # fp32 product with fp32(af), then widened
    rows = torch.arange(B * S, device=DEV).view(B, S)
    for out, x, name in ((qo, q, "q"), (ko, k, "k")):
        expected = ref.rotate_reference(x, cos, sin, rows)
        diff = (out - expected).abs()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
        same = (diff <= 1e-13 * (1 + expected.abs())).double().mean().item()
        assert same > 0.98, f"{name}: only {same:.1%} of elements match the fp32-sincos spec"
    # and the other GPU backends agree to about an fp32 ulp of cos/sin
    for backend in ("torch", "triton"):
        with pk.use_backend(backend):
            qb, kb = pk.apply_rope(q, k, inv_freq=inv, positions=positions, attention_factor=af, exact=True)
        torch.testing.assert_close(qo, qb, rtol=0, atol=1e-6 * q.abs().max().item(), msg=backend)
        torch.testing.assert_close(ko, kb, rtol=0, atol=1e-6 * k.abs().max().item(), msg=backend)


def test_rope_rows_outside_the_table_are_nan():
    """The CUDA kernel reads no values: a row outside the table gives NaN, never an out-of-bounds read (the
    value checks are the Python side's; off here)."""
    q, k = _qk(1, 4, 2, 1, 64, torch.float32)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    positions = torch.tensor([[0, 7, 8, -1]], device=DEV)  # 8 and -1 lie outside the 8-row table
    with value_checks_off():
        qo, ko = _native_rope(q, k, cos, sin, positions=positions)
        for out in (qo, ko):
            assert not out[:, :2].isnan().any()
            assert out[:, 2:].isnan().all()
        # packed with cu_seqlens: the second sequence starts past the table
        qp = torch.randn(7, 2, 64, device=DEV)
        qo, _ = _native_rope(qp, None, cos, sin, cu_seqlens=torch.tensor([0, 3, 7], device=DEV),
                             offsets=torch.tensor([0, 100], device=DEV))  # fmt: skip
        assert not qo[:3].isnan().any() and qo[3:].isnan().all()
        # an axis map naming an axis outside positions: those frequencies NaN
        am = torch.zeros(32, dtype=torch.int64, device=DEV)
        am[5] = 7
        qo, _ = _native_rope(q, None, cos, sin, positions=torch.zeros(2, 1, 4, dtype=torch.int64, device=DEV),
                             axis_map=am)  # fmt: skip
        assert qo[..., [5, 37]].isnan().all() and not qo[..., :5].isnan().any()


def test_public_api_value_checks():
    """With value checks on, the public functions refuse rows outside the table before launching (the CUDA
    kernel itself reads no values)."""
    q, k = _qk(1, 4, 2, 1, 64, torch.float32)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    q0 = q.clone()
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        pk.apply_rope_(q, k, cos, sin, positions=torch.tensor([[0, 7, 8, -1]], device=DEV))
    assert torch.equal(q, q0)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        pk.apply_rope(torch.randn(7, 2, 64, device=DEV), None, cos, sin, cu_seqlens=torch.tensor([1, 7], device=DEV))


def test_rope_empty_and_errors():
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    for shape in [(0, 3, 2, 64), (2, 0, 2, 64), (0, 2, 64)]:
        q = torch.randn(shape, device=DEV)
        _native_rope(q, None, cos, sin, inplace=True)  # no tokens: nothing launched, no error
        qo, _ = _native_rope(q, None, cos, sin)
        assert qo.shape == q.shape
    q = torch.randn(1, 3, 2, 64, device=DEV)
    q0 = q.clone()
    strided = q.transpose(2, 3).contiguous().transpose(2, 3)  # channel stride 2: refused on CUDA
    for inplace in (True, False):
        with pytest.raises(RuntimeError, match=r"q must have stride\(-1\) == 1"):
            _native_rope(strided, None, cos, sin, inplace=inplace)
        with pytest.raises(RuntimeError, match=r"k must have stride\(-1\) == 1"):
            _native_rope(q, torch.randn(1, 3, 1, 128, device=DEV)[..., ::2], cos, sin, inplace=inplace)
    with pytest.raises(RuntimeError, match="exceeds head_dim"):
        _native_rope(q[..., :32], None, cos, sin)
    with pytest.raises(RuntimeError, match="float64"):
        _native_rope(q, None, inv_freq=torch.ones(32, device=DEV), exact=True)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor|must be on"):
        _native_rope(q, None, cos.cpu(), sin.cpu())
    with pytest.raises(RuntimeError, match="cu_seqlens needs packed q/k"):
        _native_rope(q, None, cos, sin, cu_seqlens=torch.tensor([0, 3], device=DEV))
    with pytest.raises(RuntimeError, match=r"axis_map must be an integer \[R/2\] = \[32\]"):
        _native_rope(q, None, cos, sin, positions=torch.zeros(3, 1, 3, dtype=torch.long, device=DEV),
                     axis_map=torch.zeros(4, dtype=torch.long, device=DEV))  # fmt: skip
    with pytest.raises(RuntimeError, match="axis_map needs positions"):
        _native_rope(q, None, cos, sin, axis_map=torch.zeros(32, dtype=torch.long, device=DEV))
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be an integer \[N \+ 1\]"):
        _native_rope(q[0], None, cos, sin, cu_seqlens=torch.tensor([0], device=DEV))
    assert torch.equal(q, q0), "nothing may be written before an error"
    # accepted: a misaligned q (storage offset one element, channel stride 1): the scalar path
    qm = torch.randn(1, 3, 2, 65, device=DEV)[..., 1:]
    qo, _ = _native_rope(qm, None, cos, sin)
    _check_rope(qo, qm, cos, sin, _rows(1, 3, None, None, 0), False, False, "misaligned")


def test_rope_ignored_arguments_are_errors():
    """Arguments the chosen mode would ignore are refused, not silently dropped; nothing is written."""
    q = torch.randn(2, 3, 2, 64, device=DEV)
    q0 = q.clone()
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    offsets = torch.tensor([0, 2], device=DEV)
    positions = torch.zeros(2, 3, device=DEV, dtype=torch.int64)
    for inplace in (True, False):
        with pytest.raises(RuntimeError, match="attention_factor"):
            _native_rope(q, None, cos, sin, af=0.5, inplace=inplace)
        with pytest.raises(RuntimeError, match="exact applies to on-the-fly angles"):
            _native_rope(q, None, cos, sin, exact=True, inplace=inplace)
        with pytest.raises(RuntimeError, match="offset must be 0 when offsets are given"):
            _native_rope(q, None, cos, sin, offsets=offsets, offset=3, inplace=inplace)
        with pytest.raises(RuntimeError, match="offset must be 0 when positions are given"):
            _native_rope(q, None, cos, sin, positions=positions, offset=3, inplace=inplace)
        with pytest.raises(RuntimeError, match="positions or offsets, not both"):
            _native_rope(q, None, cos, sin, positions=positions, offsets=offsets, inplace=inplace)
    assert torch.equal(q, q0), "nothing may be written before an error"
    # the accepted forms still run: an offset alone, attention_factor 1.0 with tables
    qo, _ = _native_rope(q, None, cos, sin, offset=3)
    _check_rope(qo, q, cos, sin, _rows(2, 3, None, None, 3), False, False, "offset 3")


def test_rope_aliasing_checks():
    """In place, q and k must not overlap internally nor each other. Checked from metadata before any
    write (the out-of-place op writes fresh tensors only)."""
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    Hq, Hk, D = 4, 2, 64
    q, k = _qk(1, 1, Hq, Hk, D, torch.float32)  # B = S = 1: head slices stay dense, so ATen's overlap test
    q0, k0 = q.clone(), k.clone()  # can prove an overlap
    cases = [
        ("q_out has internally overlapping memory", lambda: (q[:, :, :1].expand_as(q), k)),
        ("k_out has internally overlapping memory", lambda: (q, k[:, :, :1].expand_as(k))),
        ("q_out must not overlap k_out", lambda: (q, q[:, :, :Hk])),  # k inside q
        ("q_out must not overlap k_out", lambda: (q, q)),
    ]
    for msg, make in cases:
        a = make()
        with pytest.raises(RuntimeError, match=msg):
            rope_(*a, *_args(cos, sin))
        assert torch.equal(q, q0) and torch.equal(k, k0), msg
    buf = torch.randn(1, 5, Hq, D, device=DEV)
    buf0 = buf.clone()
    with pytest.raises(RuntimeError, match="must not overlap"):
        rope_(buf[:, :4], buf[:, 1:], *_args(cos, sin))  # k is q shifted by one token
    assert torch.equal(buf, buf0)
    # out of place reads overlapping inputs fine
    qo, ko = _native_rope(q, q, cos, sin)
    assert torch.equal(qo, ko) and qo.data_ptr() != q.data_ptr()

    # accepted: the heads of one fused qkv buffer (non-dense head slices: disjoint, not provably so, accepted
    # as by ATen); a dense [3, ...] split
    for qkv, split in (
        (torch.randn(2, 5, Hq + 2 * Hk, D, device=DEV), lambda t: (t[:, :, :Hq], t[:, :, Hq:Hq + Hk])),
        (torch.randn(3, 2, 5, Hq, D, device=DEV), lambda t: (t[0], t[1])),
    ):
        q, k = split(qkv)
        q0, k0 = q.clone(), k.clone()
        rope_(q, k, *_args(cos, sin))
        rows = _rows(q.shape[0], q.shape[1], None, None, 0)
        _check_rope(q, q0, cos, sin, rows, False, False, "fused q")
        _check_rope(k, k0, cos, sin, rows, False, False, "fused k")


def test_rope_inference_tensors_and_version_counter():
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    with torch.inference_mode():
        qi = torch.randn(2, 3, 2, 64, device=DEV)
    q0 = qi.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        rope_(qi, None, *_args(cos, sin))
    assert torch.equal(qi, q0)
    want, _ = rope(q0, None, *_args(cos, sin))
    with torch.inference_mode():
        rope_(qi, None, *_args(cos, sin))
    assert torch.equal(qi, want)
    q, k = _qk(2, 3, 2, 1, 64, torch.float32)
    vq, vk = q._version, k._version
    rope_(q, k, *_args(cos, sin))
    assert (q._version, k._version) == (vq + 1, vk + 1)
    rope(q, k, *_args(cos, sin))
    assert (q._version, k._version) == (vq + 1, vk + 1)


# ---- packed varlen (cu_seqlens), multi-axis positions (axis_map)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("starts", ["offsets", "offset"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("angles", ["tables", "on_the_fly"])
def test_rope_cu_seqlens(dtype, starts, inplace, angles):
    """Packed q [T, Hq, D] / k [T, Hk, D]: an empty sequence, a padded tail past cu_seqlens[-1] (position 0),
    positions restarting at offsets[n] (or the int offset); many sequences (the kernel's binary search)."""
    lengths = [3, 0, 17, 1, 40, 5, 0, 9]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=DEV, dtype=torch.int32)
    T, D = int(cu[-1]) + 6, 128
    offsets = torch.randint(0, 50, (len(lengths),), device=DEV) if starts == "offsets" else None
    offset = 0 if offsets is not None else 7
    q = torch.randn(T, 8, D, device=DEV, dtype=dtype)
    k = torch.randn(T, 2, D, device=DEV, dtype=dtype)
    inv = pk.rope_frequencies(D)[0].to(DEV)
    pos = cu_positions(cu.tolist(), offsets.tolist() if offsets is not None else None, offset, T, DEV)
    q0, k0 = q.clone(), k.clone()
    if angles == "tables":
        cos, sin = pk.rope_cos_sin(128, inv)
        qo, ko = _native_rope(q, k, cos, sin, cu_seqlens=cu, offsets=offsets, offset=offset, inplace=inplace)
        for out, x, name in ((qo, q0, "q"), (ko, k0, "k")):
            _check_rope(out[None], x[None], cos, sin, pos[None], False, False, f"cu_seqlens {name} {dtype}")
        return
    qo, ko = _native_rope(q, k, inv_freq=inv, cu_seqlens=cu, offsets=offsets, offset=offset, inplace=inplace)
    # truth: the same fp32 angles, cos/sin in float64; baseline: fp32 tables of them in the dtype
    angle = pos.float()[:, None] * inv[None, :]
    cos32, sin32 = pk.rope_cos_sin(pos, inv)
    rows = torch.arange(T, device=DEV)[None]
    for out, x in ((qo, q0), (ko, k0)):
        truth = ref.rotate_reference(x[None], angle.double().cos(), angle.double().sin(), rows)
        assert_dtype_tolerance(out[None], truth, _eager(x[None], cos32, sin32, rows, False, False),
                               what=f"cu_seqlens on the fly {dtype}")  # fmt: skip


def _axis_tables(cos, sin, positions, axis_map, B, S):
    p = positions.to(torch.int64)
    if p.dim() == 2:
        p = p[:, None, :].expand(-1, B, S)
    rows = p[axis_map.to(torch.int64)].permute(1, 2, 0)  # [B, S, R/2]
    i = torch.arange(cos.shape[1], device=DEV)
    return cos[rows, i].flatten(0, 1), sin[rows, i].flatten(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_shape", ["ABS", "AS"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("interleaved_sections", [False, True], ids=["qwen2vl", "qwen3vl"])
def test_rope_axis_map(dtype, pos_shape, inplace, interleaved_sections):
    """Qwen2-VL's M-RoPE: head_dim 128, mrope_section [16, 24, 24], positions [3, B, S] (or [3, S]); tables
    and on-the-fly angles."""
    B, S, D = 2, 13, 128
    am = pk.mrope_axis_map([16, 24, 24], interleaved=interleaved_sections, device=DEV)
    positions = torch.randint(0, 64, (3, B, S) if pos_shape == "ABS" else (3, S), device=DEV)
    q, k = _qk(B, S, 8, 2, D, dtype, "bhsd")
    q0, k0 = q.clone(), k.clone()
    cos, sin = pk.rope_cos_sin(64, pk.rope_frequencies(D, 1e6)[0].to(DEV))
    qo, ko = _native_rope(q, k, cos, sin, positions=positions, axis_map=am, inplace=inplace)
    c_eff, s_eff = _axis_tables(cos, sin, positions, am, B, S)
    rows = torch.arange(B * S, device=DEV).view(B, S)
    for out, x, name in ((qo, q0, "q"), (ko, k0, "k")):
        _check_rope(out, x, c_eff, s_eff, rows, False, False, f"axis_map {name}")
    inv = pk.rope_frequencies(D, 1e6)[0].to(DEV)
    qf, _ = _native_rope(q0, None, inv_freq=inv, positions=positions, axis_map=am)
    p = positions if positions.dim() == 3 else positions[:, None, :].expand(-1, B, S)
    pos_i = p[am.long()].permute(1, 2, 0).flatten(0, 1)  # [B * S, R/2]
    angle = pos_i.float() * inv[None, :]  # one fp32 product; truth: its cos/sin in float64
    truth = ref.rotate_reference(q0, angle.double().cos(), angle.double().sin(), rows)
    assert_dtype_tolerance(qf, truth, _eager(q0, angle.cos(), angle.sin(), rows, False, False),
                           what="axis_map on the fly")  # fmt: skip


def test_rope_more_head_groups_than_grid_y():
    """Heads x work so large that the head split would need more than 65535 blocks along grid.y: the
    launcher caps the groups and gives each block more heads (it used to fail with an invalid config)."""
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs ~10 GiB of free GPU memory (4.5 GiB of q/q_out plus chunked temporaries)")
    Hq, Hk, D = 560_000_000, 8, 2  # D = 2: one unit per head (scalar path), ~68k groups before the cap
    cos, sin = pk.rope_cos_sin(4, pk.rope_frequencies(D)[0].to(DEV))
    q = torch.randn(1, 1, Hq, D, device=DEV, dtype=torch.float16)
    k = torch.randn(1, 1, Hk, D, device=DEV, dtype=torch.float16)
    qo, ko = _native_rope(q, k, cos, sin, offset=3)  # outputs NaN-poisoned at allocation
    torch.cuda.synchronize()
    row = torch.full((1, 1), 3, device=DEV)

    def check(out, x, name):
        for h0 in range(0, x.shape[2], 1 << 26):  # every head, in chunks (bounded temporaries)
            got = out[0, 0, h0:h0 + (1 << 26)].float()
            want = ref.rotate_reference(x[:, :, h0:h0 + (1 << 26)], cos, sin, row, dtype=torch.float32)[0, 0]
            assert not got.isnan().any(), f"{name}: heads from {h0} not written"
            torch.testing.assert_close(got, want.half().float(), rtol=2**-10, atol=2**-14, msg=f"{name} {h0}")

    check(qo, q, "q")
    check(ko, k, "k")


def test_rope_cuda_graph_capture_and_no_allocation():
    q, k = _qk(4, 1, 32, 8, 128, torch.bfloat16)
    cos, sin = pk.rope_cos_sin(4096, pk.rope_frequencies(128, 500000.0)[0].to(DEV))
    pos = torch.tensor([[3], [100], [4000], [0]], device=DEV)
    sq, sk = q.clone(), k.clone()
    _native_rope(sq.clone(), sk.clone(), cos, sin, positions=pos, inplace=True)  # warm-up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        rope_(sq, sk, *_args(cos, sin, positions=pos))
    for _ in range(3):
        new_pos = torch.randint(0, 4096, (4, 1), device=DEV)
        pos.copy_(new_pos)
        sq.copy_(q)
        sk.copy_(k)
        g.replay()
        _check_rope(sq, q, cos, sin, new_pos, False, False, "graph q")
        _check_rope(sk, k, cos, sin, new_pos, False, False, "graph k")
    # packed varlen with cu_seqlens captured too (the kernel resolves positions: no host sync)
    qp = torch.randn(64, 8, 128, device=DEV, dtype=torch.bfloat16)
    sp = qp.clone()
    cu = torch.tensor([0, 10, 64], device=DEV)
    rope_(sp.clone(), None, *_args(cos, sin, cu_seqlens=cu))
    torch.cuda.synchronize()
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        rope_(sp, None, *_args(cos, sin, cu_seqlens=cu))
    cu.copy_(torch.tensor([0, 30, 50], device=DEV))  # 14 padded tokens: position 0
    sp.copy_(qp)
    g2.replay()
    _check_rope(sp[None], qp[None], cos, sin, cu_positions([0, 30, 50], None, 0, 64, DEV)[None], False, False, "graph cu")
    # in place: nothing allocated, not even temporaries
    big_q, big_k = _qk(1, 8192, 32, 8, 128, torch.bfloat16)
    cos, sin = pk.rope_cos_sin(8192, pk.rope_frequencies(128)[0].to(DEV))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    rope_(big_q, big_k, *_args(cos, sin))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.max_memory_allocated() == before, "in-place native rope allocated memory"


def test_rope_opcheck():
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    inv = pk.rope_frequencies(64)[0].to(DEV)
    q, k = _qk(2, 3, 4, 2, 64, torch.float32)
    pos = torch.randint(0, 8, (2, 3), device=DEV)
    cases = [
        (q, k, *_args(cos, sin, offset=2)),
        (q, k, *_args(cos, sin, positions=pos, interleaved=True, conjugate=True)),
        (q, None, *_args(inv_freq=inv, offsets=torch.tensor([1, 4], device=DEV), af=2.0)),
        (q.double(), None, *_args(inv_freq=inv.double(), positions=pos, exact=True)),
        (torch.randn(7, 4, 64, device=DEV), None, *_args(cos, sin, cu_seqlens=torch.tensor([0, 3, 7], device=DEV))),
        (q, k, *_args(cos, sin, positions=torch.randint(0, 8, (3, 2, 3), device=DEV),
                      axis_map=pk.mrope_axis_map([8, 12, 12], device=DEV))),
    ]
    for args in cases:
        torch.library.opcheck(rope_, args)
        torch.library.opcheck(rope, args)


# ----------------------------------------------------------------------------------------------
# Through the public API: use_backend("native") reaches these kernels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_public_api_native_backend(interleaved, monkeypatch):
    q, k = _qk(2, 13, 8, 2, 128, torch.bfloat16, "bhsd")
    cos, sin = pk.rope_cos_sin(64, pk.rope_frequencies(128)[0].to(DEV))
    positions = torch.randint(0, 64, (2, 13), device=DEV)
    x = torch.randn(2, 9, 64, device=DEV, dtype=torch.float16)
    real = registry.run_python

    def no_python(spec, backend, args):  # the ops with a native CUDA kernel must not run a Python one
        assert not (spec.native and spec.name in _native.ops_for("CUDA")), f"{spec.name} ran {backend}"
        return real(spec, backend, args)

    with pk.use_backend("native"):
        assert registry.registered_kernels("rope_")["BackendSelect"] == "chooser"
        assert_native_cuda("rope_")
        monkeypatch.setattr(registry, "run_python", no_python)
        qo, ko = pk.apply_rope(q, k, cos, sin, positions=positions, interleaved=interleaved)
        y = pk.add_sinusoidal(x, offsets=3) if PORTED else None
        monkeypatch.setattr(registry, "run_python", real)
    with pk.use_backend("triton"):
        qt, kt = pk.apply_rope(q, k, cos, sin, positions=positions, interleaved=interleaved)
        yt = pk.add_sinusoidal(x, offsets=3) if PORTED else None
    _check_rope(qo, q, cos, sin, positions, interleaved, False, "public q")
    _check_rope(ko, k, cos, sin, positions, interleaved, False, "public k")
    # the two GPU backends agree to within an ulp or so of the storage type
    torch.testing.assert_close(qo, qt, rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(ko, kt, rtol=2 ** -7, atol=2 ** -7)
    if PORTED:
        torch.testing.assert_close(y, yt, rtol=2 ** -10, atol=2 ** -10)
        assert math.isfinite(y.float().sum().item())
