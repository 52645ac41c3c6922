"""The native CPU RoPE kernel's values through the public ops: fp32/fp16/bf16/fp64, NeoX/GPT-J, partial
rotary, GQA, positions/offsets, HF-transposed and channel strides in place, packed with cu_seqlens, axis maps,
tables and on-the-fly/exact angles, NaN rows with value checks off, the Python value-check messages, and the
public API on the native backend (values, gradients, torch.compile)."""


import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.ops.rope.op import check_rope

from conftest import assert_dtype_tolerance, max_err
from positions_oracle import cu_positions
from native_common import *  # noqa: F401,F403  (the shared helpers: native_common.__all__)

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native extension unavailable: {_native.load_error()}")


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
