"""The CUDA C++ RoPE kernel (needs a GPU): values for tables, shapes, rows, conjugate, on-the-fly and
exact angles, cu_seqlens, axis maps, many head groups, CUDA graphs, opcheck, the public API.
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
from .native_cuda_common import *  # noqa: F401,F403  (the shared helpers: native_cuda_common.__all__)
from .cuda_rope_common import _rows, _args, _native_rope, _eager, _check_rope, _qk, _axis_tables


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu_check.sh)")


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
