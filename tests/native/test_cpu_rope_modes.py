"""The native CPU RoPE kernel's position modes: on-the-fly and exact angles, the parallel path,
cu_seqlens (against the position oracle), packed 3-D input, M-RoPE axis maps.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref

from conftest import assert_dtype_tolerance, max_err
from positions_oracle import cu_positions
from .native_common import *  # noqa: F401,F403  (the shared helpers: native_common.__all__)

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native extension unavailable: {_native.load_error()}")


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
