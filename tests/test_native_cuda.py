"""The CUDA C++ kernels (csrc/rope_cuda.cu, csrc/sinusoidal_cuda.cu) against the float64 references.

These need a GPU and run in benchmarks/gpu_check.sh on a CUDA machine (the extension is built there first);
without CUDA every test here is skipped, and CI covers the same sources with the compile-only check
(scripts/check_cuda_compile, run by .ci/run). The ops are called directly (``posenc::native_rope`` /
``posenc::native_sinusoidal`` via ``posenc_kernels._native``) to reach every mode - tables, on-the-fly and
exact angles, attention factor - then once more through the public API under ``use_backend("native")``.
"""

import math

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.ops.angles import exact_angles as _exact_angles
from posenc_kernels.sinusoidal import _inv_freq

from conftest import assert_dtype_tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu_check.sh)")

DEV = torch.device("cuda")
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    # On the GPU machine the extension must be there: a missing one is a failure, not a skip.
    assert _native.load(), f"native extension did not load: {_native.load_error()}"
    assert _native.has_op("rope", "cuda") and _native.has_op("sinusoidal", "cuda"), "no CUDA kernels registered"


def _nan_like(x):
    return torch.full_like(x, float("nan"))


def _rows(B, S, positions, offsets, offset):
    if positions is not None:
        return positions.to(torch.int64).expand(B, S)
    s = torch.arange(S, device=DEV)
    if offsets is not None:
        return offsets.to(torch.int64)[:, None] + s
    return (s + offset).expand(B, S)


def _native_rope(q, k, cos=None, sin=None, *, inv_freq=None, positions=None, offsets=None, offset=0, af=1.0,
                 interleaved=False, conjugate=False, exact=False, inplace=False):
    if inplace:
        qo, ko = q, k
    else:
        qo = _nan_like(q)
        ko = _nan_like(k) if k is not None else None
    _native.rope(q, k, qo, ko, cos, sin, inv_freq, positions, offsets, offset, af, interleaved, conjugate, exact)
    return qo, ko


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
    cos, sin = pk.rope_cos_sin(9, pk.rope_frequencies(64)[0].to(DEV), dtype=torch.float64)
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
    q, k = _qk(1, 4, 2, 1, 64, torch.float32)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    positions = torch.tensor([[0, 7, 8, -1]], device=DEV)  # 8 and -1 lie outside the 8-row table
    qo, ko = _native_rope(q, k, cos, sin, positions=positions)
    for out in (qo, ko):
        assert not out[:, :2].isnan().any()
        assert out[:, 2:].isnan().all()


def test_rope_empty_and_errors():
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    q = torch.randn(0, 3, 2, 64, device=DEV)
    _native_rope(q, None, cos, sin)  # no tokens: nothing launched, no error
    q = torch.randn(1, 3, 2, 64, device=DEV)
    with pytest.raises(RuntimeError, match="stride"):
        _native_rope(q.transpose(2, 3).contiguous().transpose(2, 3), None, cos, sin)
    with pytest.raises(RuntimeError, match="exceeds head_dim"):
        _native_rope(q[..., :32], None, cos, sin)
    with pytest.raises(RuntimeError, match="float64"):
        _native_rope(q, None, inv_freq=torch.ones(32, device=DEV), exact=True)


def _rope_call(q, k, qo, ko, cos, sin, *, positions=None, offsets=None, offset=0, af=1.0, exact=False):
    _native.rope(q, k, qo, ko, cos, sin, None, positions, offsets, offset, af, False, False, exact)


def test_rope_ignored_arguments_are_errors():
    """Arguments the chosen mode would ignore are refused, not silently dropped."""
    q = torch.randn(2, 3, 2, 64, device=DEV)
    qo = _nan_like(q)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    with pytest.raises(RuntimeError, match="attention_factor"):
        _rope_call(q, None, qo, None, cos, sin, af=0.5)
    with pytest.raises(RuntimeError, match="exact applies to on-the-fly angles"):
        _rope_call(q, None, qo, None, cos, sin, exact=True)
    offsets = torch.tensor([0, 2], device=DEV)
    with pytest.raises(RuntimeError, match="offset must be 0 when offsets are given"):
        _rope_call(q, None, qo, None, cos, sin, offsets=offsets, offset=3)
    positions = torch.zeros(2, 3, device=DEV, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="offset must be 0 when positions are given"):
        _rope_call(q, None, qo, None, cos, sin, positions=positions, offset=3)
    with pytest.raises(RuntimeError, match="positions or offsets, not both"):
        _rope_call(q, None, qo, None, cos, sin, positions=positions, offsets=offsets)
    inv = _inv_freq(32, 10000.0, 0.0, DEV, torch.float32)
    out = torch.full((2, 3, 64), float("nan"), device=DEV)
    with pytest.raises(RuntimeError, match="offset must be 0 when offsets are given"):
        _native_sin(None, out, inv, offsets=offsets, offset=3)
    assert qo.isnan().all() and out.isnan().all(), "nothing may be written before an error"
    # the accepted forms still run: an offset alone, attention_factor 1.0 with tables
    _rope_call(q, None, qo, None, cos, sin, offset=3)
    _check_rope(qo, q, cos, sin, _rows(2, 3, None, None, 3), False, False, "offset 3")


def test_rope_aliasing_checks():
    """Outputs must not overlap internally, must be exactly their input or disjoint from it, and must not
    overlap the other tensors of the launch. Checked from metadata before any write."""
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    Hq, Hk, D = 4, 2, 64

    def fresh():  # B = S = 1: head slices stay dense, so ATen's overlap test can prove an overlap
        q, k = _qk(1, 1, Hq, Hk, D, torch.float32)
        return q, k, _nan_like(q), _nan_like(k)

    q, k, qo, ko = fresh()
    q0, k0 = q.clone(), k.clone()
    cases = [
        ("q_out has internally overlapping memory", lambda: (q, k, qo[:, :, :1].expand_as(q), ko)),
        ("k_out has internally overlapping memory", lambda: (q, k, qo, ko[:, :, :1].expand_as(k))),
        ("q_out must not overlap k_out", lambda: (q, k, qo, qo[:, :, :Hk])),
        ("q_out must not overlap k", lambda: (q, qo[:, :, :Hk], qo, ko)),
        ("k_out must not overlap q", lambda: (q, k, qo, q[:, :, :Hk])),
        ("q_out must not overlap k_out", lambda: (q, q[:, :, :Hk], q, q[:, :, :Hk])),  # in place, k inside q
    ]
    for msg, make in cases:
        a = make()
        with pytest.raises(RuntimeError, match=msg):
            _rope_call(*a, cos, sin)
        assert torch.equal(q, q0) and torch.equal(k, k0) and qo.isnan().all() and ko.isnan().all(), msg
    # q_out partially overlapping q (shifted by one token), and q_out at q's address with other strides
    buf = torch.randn(1, 5, Hq, D, device=DEV)
    with pytest.raises(RuntimeError, match="q_out overlaps q without being exactly q"):
        _rope_call(buf[:, :4], None, buf[:, 1:], None, cos, sin)
    base = torch.randn(1, Hq, 3, D, device=DEV)  # [B, H, S, D]: its transpose and a plain view of it share
    with pytest.raises(RuntimeError, match="q_out overlaps q without being exactly q"):  # the address only
        _rope_call(base.transpose(1, 2), None, base.view(1, 3, Hq, D), None, cos, sin)
    q3 = torch.randn(1, 3, Hq, D, device=DEV)
    kbase = torch.randn(1, Hk, 3, D, device=DEV)
    with pytest.raises(RuntimeError, match="k_out overlaps k without being exactly k"):
        _rope_call(q3, kbase.transpose(1, 2), _nan_like(q3), kbase.view(1, 3, Hk, D), cos, sin)

    # accepted: in place through another tensor object with the same layout; the heads of one fused qkv
    # buffer (non-dense head slices: disjoint, not provably so, accepted as by ATen); a dense [3, ...] split
    q, k, _, _ = fresh()
    q0 = q.clone()
    _rope_call(q, None, q.view_as(q), None, cos, sin)
    _check_rope(q, q0, cos, sin, _rows(1, 1, None, None, 0), False, False, "in place via a view")
    for qkv, split in (
        (torch.randn(2, 5, Hq + 2 * Hk, D, device=DEV), lambda t: (t[:, :, :Hq], t[:, :, Hq:Hq + Hk])),
        (torch.randn(3, 2, 5, Hq, D, device=DEV), lambda t: (t[0], t[1])),
    ):
        q, k = split(qkv)
        q0, k0 = q.clone(), k.clone()
        _rope_call(q, k, q, k, cos, sin)
        rows = _rows(q.shape[0], q.shape[1], None, None, 0)
        _check_rope(q, q0, cos, sin, rows, False, False, "fused q")
        _check_rope(k, k0, cos, sin, rows, False, False, "fused k")


def test_rope_more_head_groups_than_grid_y():
    """Heads x work so large that the head split would need more than 65535 blocks along grid.y: the
    launcher caps the groups and gives each block more heads (it used to fail with an invalid config)."""
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs ~10 GiB of free GPU memory (4.5 GiB of q/q_out plus chunked temporaries)")
    Hq, Hk, D = 560_000_000, 8, 2  # D = 2: one unit per head (scalar path), ~68k groups before the cap
    cos, sin = pk.rope_cos_sin(4, pk.rope_frequencies(D)[0].to(DEV))
    q = torch.randn(1, 1, Hq, D, device=DEV, dtype=torch.float16)
    k = torch.randn(1, 1, Hk, D, device=DEV, dtype=torch.float16)
    qo, ko = _nan_like(q), _nan_like(k)
    _rope_call(q, k, qo, ko, cos, sin, offset=3)
    torch.cuda.synchronize()
    c, s = cos[3, 0].item(), sin[3, 0].item()

    def check(out, x, name):
        for h0 in range(0, x.shape[2], 1 << 26):  # every head, in chunks (bounded temporaries)
            xs, got = x[0, 0, h0:h0 + (1 << 26)].float(), out[0, 0, h0:h0 + (1 << 26)].float()
            want = torch.stack((xs[:, 0] * c - xs[:, 1] * s, xs[:, 1] * c + xs[:, 0] * s), -1)
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
        _native_rope(sq, sk, cos, sin, positions=pos, inplace=True)
    for _ in range(3):
        new_pos = torch.randint(0, 4096, (4, 1), device=DEV)
        pos.copy_(new_pos)
        sq.copy_(q)
        sk.copy_(k)
        g.replay()
        _check_rope(sq, q, cos, sin, new_pos, False, False, "graph q")
        _check_rope(sk, k, cos, sin, new_pos, False, False, "graph k")
    # in place: nothing allocated, not even temporaries
    big_q, big_k = _qk(1, 8192, 32, 8, 128, torch.bfloat16)
    cos, sin = pk.rope_cos_sin(8192, pk.rope_frequencies(128)[0].to(DEV))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _native_rope(big_q, big_k, cos, sin, inplace=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.max_memory_allocated() == before, "in-place native rope allocated memory"


# ----------------------------------------------------------------------------------------------
# Sinusoidal
# ----------------------------------------------------------------------------------------------


def _native_sin(x, out, inv, positions=None, offsets=None, offset=0, x_scale=1.0, scale=1.0, interleaved=True,
                cos_first=False):
    _native.sinusoidal(x, out, positions, offsets, offset, x_scale, inv, scale, interleaved, cos_first)
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("cos_first", [False, True])
@pytest.mark.parametrize("D", [64, 80, 33, 1, 6])
def test_sinusoidal_table(dtype, interleaved, cos_first, D):
    B, S = 2, 37
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    conv = dict(interleaved=interleaved, cos_first=cos_first, freq_shift=0.0, scale=1.3)
    inv = _inv_freq(D // 2, 10000.0, 0.0, DEV, math_dtype)
    out = _native_sin(None, torch.full((B, S, D), float("nan"), device=DEV, dtype=dtype), inv, offset=5,
                      scale=1.3, interleaved=interleaved, cos_first=cos_first)
    pos = (torch.arange(S, device=DEV) + 5).to(math_dtype).expand(B, S)
    truth = ref.sinusoidal_table_reference(pos, D, **conv)
    with pk.use_backend("torch"):
        same_in_torch = pk.add_sinusoidal(torch.zeros(B, S, D, device=DEV, dtype=dtype), offset=5, **conv)
    assert_dtype_tolerance(out, truth, same_in_torch, what=f"table {dtype} D={D}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows", ["positions_int", "positions_float", "positions_s", "offsets"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("inplace", [False, True])
def test_sinusoidal_add(dtype, rows, layout, inplace):
    B, S, D = 3, 11, 128
    x = torch.randn(B, S, D + (1 if layout == "misaligned" else 0), device=DEV, dtype=dtype)
    if layout == "misaligned":
        x = x[..., 1:]
    elif layout == "strided":
        x = torch.randn(S, B, D, device=DEV, dtype=dtype).transpose(0, 1)
    kw = {}
    if rows == "positions_int":
        kw["positions"] = torch.randint(0, 1000, (B, S), device=DEV, dtype=torch.int32)
    elif rows == "positions_float":
        kw["positions"] = torch.rand(B, S, device=DEV) * 1000
    elif rows == "positions_s":
        kw["positions"] = torch.randint(0, 1000, (S,), device=DEV)
    else:
        kw["offset"] = torch.randint(0, 100, (B,), device=DEV)
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv = _inv_freq(D // 2, 10000.0, 1.0, DEV, math_dtype)
    conv = dict(interleaved=False, cos_first=True, freq_shift=1.0)
    x0 = x.clone()
    out = x if inplace else torch.full_like(x, float("nan"))
    offsets = kw.get("offset")
    _native_sin(x, out, inv, positions=kw.get("positions"), offsets=offsets, x_scale=2.0, interleaved=False,
                cos_first=True)
    truth = ref.add_sinusoidal_reference(x0, x_scale=2.0, **kw, **conv)
    with pk.use_backend("torch"):
        same_in_torch = pk.add_sinusoidal(x0, x_scale=2.0, **kw, **conv)
    assert_dtype_tolerance(out, truth, same_in_torch, what=f"add {dtype} {rows} {layout}")


def test_sinusoidal_graph_and_no_allocation():
    x = torch.randn(4, 8192, 1024, device=DEV, dtype=torch.bfloat16)
    inv = _inv_freq(512, 10000.0, 0.0, DEV, torch.float32)
    _native_sin(x, x, inv)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _native_sin(x, x, inv)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before, "in-place native sinusoidal allocated memory"
    offsets = torch.zeros(2, device=DEV, dtype=torch.int64)
    out = torch.empty(2, 16, 64, device=DEV)
    inv = _inv_freq(32, 10000.0, 0.0, DEV, torch.float32)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _native_sin(None, out, inv, offsets=offsets)
    for start in (0, 100, 5000):
        offsets.fill_(start)
        g.replay()
        truth = ref.sinusoidal_table_reference((torch.arange(16, device=DEV) + start).float(), 64)
        torch.testing.assert_close(out[1], truth.float(), rtol=0, atol=2e-6 * max(1, start / 100))


def test_sinusoidal_aliasing_checks():
    inv = _inv_freq(32, 10000.0, 0.0, DEV, torch.float32)
    out = torch.full((1, 1, 64), float("nan"), device=DEV)
    with pytest.raises(RuntimeError, match="out has internally overlapping memory"):
        _native_sin(None, out.expand(2, 3, 64), inv)
    buf = torch.randn(1, 6, 64, device=DEV)
    buf0 = buf.clone()
    with pytest.raises(RuntimeError, match="out overlaps x without being exactly x"):
        _native_sin(buf[:, :5], buf[:, 1:], inv)
    assert torch.equal(buf, buf0), "nothing may be written before an error"
    # in place through another tensor object with the same layout is fine
    x = buf[:, :5]
    truth = ref.add_sinusoidal_reference(x.clone())
    _native_sin(x, x.view_as(x), inv)
    torch.testing.assert_close(x, truth.float(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Through the public API: use_backend("native") reaches these kernels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_public_api_native_backend(interleaved):
    q, k = _qk(2, 13, 8, 2, 128, torch.bfloat16, "bhsd")
    cos, sin = pk.rope_cos_sin(64, pk.rope_frequencies(128)[0].to(DEV))
    positions = torch.randint(0, 64, (2, 13), device=DEV)
    with pk.use_backend("native"):
        qo, ko = pk.apply_rope(q, k, cos, sin, positions=positions, interleaved=interleaved)
        x = torch.randn(2, 9, 64, device=DEV, dtype=torch.float16)
        y = pk.add_sinusoidal(x, offset=3)
    with pk.use_backend("triton"):
        qt, kt = pk.apply_rope(q, k, cos, sin, positions=positions, interleaved=interleaved)
        yt = pk.add_sinusoidal(x, offset=3)
    _check_rope(qo, q, cos, sin, positions, interleaved, False, "public q")
    _check_rope(ko, k, cos, sin, positions, interleaved, False, "public k")
    # the two GPU backends agree to within an ulp or so of the storage type
    torch.testing.assert_close(qo, qt, rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(ko, kt, rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(y, yt, rtol=2 ** -10, atol=2 ** -10)
    assert math.isfinite(y.float().sum().item())
