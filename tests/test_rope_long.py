"""RoPE beyond tables: on-the-fly and exact angles, packed varlen batches, packed QKV, multi-axis positions
(M-RoPE, axial), context parallelism - values vs references, gradients, ops, compile, errors."""

import math

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

from conftest import DEVICE, DTYPES, assert_dtype_tolerance, max_err
from positions_oracle import cu_positions

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


def qk(B, S, Hq, Hk, D, dtype=torch.float32):
    return torch.randn(B, S, Hq, D, device=DEVICE, dtype=dtype), torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype)


def same(a, b, backend):
    """Bit-equal; the native CPU kernels use the C library's cosf/sinf (the table and axis-map paths use
    torch's or numpy's, and axis maps run on the torch path) and round ``a*c - b*s`` without FMA, so there
    two paths agree to the operands' last ulp instead."""
    if backend == "native":  # a last-ulp difference of the operands, measured at the largest magnitude
        limit = 2 * torch.finfo(a.dtype).eps * b.abs().max().item()
        assert max_err(a, b) <= limit, (max_err(a, b), limit)
    else:
        assert torch.equal(a, b)


def rotate_with_rows(x, cos, sin, rows, *, interleaved=False, dtype=torch.float64):
    """float64 truth for x [B, S, H, D] with an explicit [B, S] table row per token."""
    return ref.rotate_reference(x, cos, sin, rows, interleaved=interleaved, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# On-the-fly angles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_on_the_fly_equals_table_path(backend, dtype, interleaved):
    """Default numerics are the tables' (one fp32 product, fp32 cos/sin, times attention_factor): the two
    paths agree to the last bit."""
    inv, _ = pk.rope_frequencies(96, 500000.0)
    inv = inv.to(DEVICE)
    q, k = qk(2, 9, 4, 2, 112, dtype)
    offs = torch.tensor([3, 1000], device=DEVICE)
    cos, sin = pk.rope_cos_sin(1100, inv, attention_factor=1.25)
    qt, kt = pk.apply_rope(q, k, cos, sin, offsets=offs, interleaved=interleaved)
    qf, kf = pk.apply_rope(q, k, inv_freq=inv, attention_factor=1.25, offsets=offs, interleaved=interleaved)
    same(qf, qt, backend)
    same(kf, kt, backend)
    q2, k2 = q.clone(), k.clone()
    pk.apply_rope_(q2, k2, inv_freq=inv, attention_factor=1.25, offsets=offs, interleaved=interleaved)
    same(q2, qt, backend)
    same(k2, kt, backend)


def test_on_the_fly_matches_hf_numerics(backend):
    """HF: freqs = inv_freq.float() @ positions.float() (an exact fp32 product), emb.cos() * scaling."""
    inv, _ = pk.rope_frequencies(64, 10000.0)
    pos = torch.arange(0, 70000, 997)
    hf_cos = (pos[:, None].float() * inv[None, :]).cos()
    hf_sin = (pos[:, None].float() * inv[None, :]).sin()
    q = torch.zeros(1, pos.numel(), 1, 64, device=DEVICE)
    q[..., :32] = 1.0  # x1 = 1, x2 = 0: the output pair is (cos, sin)
    out, _ = pk.apply_rope(q, None, inv_freq=inv.to(DEVICE), positions=pos.to(DEVICE))
    assert max_err(out[0, :, 0, :32].cpu(), hf_cos) <= 2e-7 and max_err(out[0, :, 0, 32:].cpu(), hf_sin) <= 2e-7


def _angle_error(backend_out, pos, inv64):
    """|angle(out) - pos * inv| wrapped to [-pi, pi] for unit pairs (1, 0) rotated in fp32."""
    c, s = backend_out[..., 0].double(), backend_out[..., 1].double()
    got = torch.atan2(s, c)
    truth = (pos.double()[:, None] * inv64[None, :]).remainder(2 * math.pi)
    return ((got - truth + math.pi).remainder(2 * math.pi) - math.pi).abs().max().item()


SCHEDULES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}  # fmt: skip


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_exact_angles_within_1e6_rad_up_to_2_pow_22(backend, schedule):
    """exact=True: the angle stays within 1e-6 rad of the float64 truth at positions up to 2**22, where the
    default fp32 product is off by radians."""
    R = 128
    inv64, af = pk.rope_frequencies(R, 500000.0, scaling=SCHEDULES[schedule], dtype=torch.float64)
    pos = torch.cat([torch.arange(0, 64), torch.randint(0, 2**22, (192,)), torch.tensor([2**22 - 1, 2**22])])
    x = torch.zeros(1, pos.numel(), 1, R, device=DEVICE)
    x[..., 0::2] = 1.0  # interleaved pairs (1, 0)
    out, _ = pk.apply_rope(x, None, inv_freq=inv64.to(DEVICE), positions=pos.to(DEVICE), exact=True, interleaved=True)
    pairs = (out[0, :, 0] / af).cpu().unflatten(-1, (R // 2, 2))
    err = _angle_error(pairs, pos, inv64)
    assert err <= 1e-6, f"exact angle error {err:.3g} rad"
    out_default, _ = pk.apply_rope(x, None, inv_freq=inv64.float().to(DEVICE), positions=pos.to(DEVICE), interleaved=True)
    err_default = _angle_error((out_default[0, :, 0] / af).cpu().unflatten(-1, (R // 2, 2)), pos, inv64)
    assert err_default > 1e-2, "the default fp32 product was expected to be far off at 2**22"


def test_exact_needs_float64_frequencies_and_rejects_tables():
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    inv, _ = pk.rope_frequencies(16)
    with pytest.raises(TypeError, match="exact=True needs inv_freq in float64"):
        pk.apply_rope_(q, None, inv_freq=inv.to(DEVICE), exact=True)
    cos, sin = pk.rope_cos_sin(4, inv.to(DEVICE))
    with pytest.raises(ValueError, match="exact applies to on-the-fly angles"):
        pk.apply_rope_(q, None, cos, sin, exact=True)
    with pytest.raises(ValueError, match="attention_factor scales on-the-fly angles"):
        pk.apply_rope_(q, None, cos, sin, attention_factor=2.0)
    with pytest.raises(ValueError, match="pass cos/sin tables or inv_freq, not both"):
        pk.apply_rope_(q, None, cos, sin, inv_freq=inv.to(DEVICE))
    with pytest.raises(ValueError, match="pass cos and sin tables, or inv_freq"):
        pk.apply_rope_(q, None, cos)
    with pytest.raises(ValueError, match=r"rotary dim R = 2 \* inv_freq.shape\[0\] = 32 exceeds head_dim D = 16"):
        pk.apply_rope_(q, None, inv_freq=pk.rope_frequencies(32)[0].to(DEVICE))


# ---------------------------------------------------------------------------------------------
# Packed varlen
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offsets", ["int", "tensor", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_cu_seqlens(backend, dtype, offsets):
    cu_list = [0, 5, 5, 6, 13, 20]  # an empty sequence and a single-token one
    T = cu_list[-1] + 3  # three padded tokens past the last sequence: position 0
    off_list = [2, 0, 7, 1, 30]
    off = {"int": 4, "tensor": torch.tensor(off_list, device=DEVICE, dtype=torch.int32), "none": 0}[offsets]
    rows = cu_positions(cu_list, off_list if offsets == "tensor" else None, 0 if offsets == "tensor" else off, T)
    cos, sin = pk.rope_cos_sin(40, pk.rope_frequencies(48)[0].to(DEVICE))
    q, k = qk(1, T, 4, 2, 64, dtype)
    cu = torch.tensor(cu_list, device=DEVICE, dtype=torch.int32)
    truth_q = rotate_with_rows(q, cos, sin, rows[None].to(DEVICE))
    eager_q = rotate_with_rows(q, cos, sin, rows[None].to(DEVICE), dtype=dtype)
    truth_k = rotate_with_rows(k, cos, sin, rows[None].to(DEVICE))
    eager_k = rotate_with_rows(k, cos, sin, rows[None].to(DEVICE), dtype=dtype)
    out_q, out_k = pk.apply_rope(q[0], k[0], cos, sin, cu_seqlens=cu, offsets=off)
    assert out_q.shape == q[0].shape
    assert_dtype_tolerance(out_q, truth_q[0], eager_q[0], what="varlen q")
    assert_dtype_tolerance(out_k, truth_k[0], eager_k[0], what="varlen k")
    q3, k3 = q[0].clone(), k[0].clone()
    pk.apply_rope_(q3, k3, cos, sin, cu_seqlens=cu, offsets=off)
    assert torch.equal(q3, out_q) and torch.equal(k3, out_k)
    # Same as per-token positions.
    q4, _ = pk.apply_rope(q[0], None, cos, sin, positions=rows.to(DEVICE))
    assert torch.equal(q4, out_q)


def test_varlen_on_the_fly_and_int64(backend):
    inv, _ = pk.rope_frequencies(32)
    inv = inv.to(DEVICE)
    cu = torch.tensor([0, 3, 10, 11], device=DEVICE)  # int64
    x = torch.randn(11, 3, 32, device=DEVICE)
    rows = cu_positions([0, 3, 10, 11], None, 100, 11)
    out, _ = pk.apply_rope(x, None, inv_freq=inv, cu_seqlens=cu, offsets=100)
    want, _ = pk.apply_rope(x, None, inv_freq=inv, positions=rows.to(DEVICE))
    assert torch.equal(out, want)


@pytest.mark.parametrize("n_seqs", [255, 256, 257, 600])
def test_varlen_many_sequences(backend, n_seqs):
    """More sequences than one read of cu_seqlens covers (256 at a time in the kernel): every chunk
    boundary, empty sequences, per-sequence offsets and padded tokens, against per-token positions."""
    g = torch.Generator().manual_seed(n_seqs)
    lengths = torch.randint(0, 3, (n_seqs,), generator=g)  # a third of them empty
    cu_list = [0] + torch.cumsum(lengths, 0).tolist()
    T = cu_list[-1] + 2
    off_list = torch.randint(0, 50, (n_seqs,), generator=g).tolist()
    rows = cu_positions(cu_list, off_list, 0, T)
    inv, _ = pk.rope_frequencies(32)
    cos, sin = pk.rope_cos_sin(64, inv.to(DEVICE))
    x = torch.randn(T, 2, 32, generator=g).to(DEVICE)
    for cu_dtype in (torch.int32, torch.int64):
        cu = torch.tensor(cu_list, device=DEVICE, dtype=cu_dtype)
        out, _ = pk.apply_rope(x, None, cos, sin, cu_seqlens=cu, offsets=torch.tensor(off_list, device=DEVICE))
        want, _ = pk.apply_rope(x, None, cos, sin, positions=rows.to(DEVICE))
        assert torch.equal(out, want), cu_dtype


def test_varlen_bad_input():
    cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(16)[0].to(DEVICE))
    x = torch.randn(8, 2, 16, device=DEVICE)
    x0 = x.clone()
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and never decrease"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 5, 3, 8], device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([1, 5, 8], device=DEVICE))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 9 exceeds the 8 packed tokens"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 5, 9], device=DEVICE))
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0.0, 8.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[N \+ 1\]"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match=r"offsets must have shape \[B\] = \[2\]"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE), offsets=torch.tensor([1]))
    with pytest.raises(ValueError, match="the table's rows"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE), offsets=13)
    with pytest.raises(ValueError, match="cu_seqlens needs packed q/k"):
        pk.apply_rope_(x[None], None, cos, sin, cu_seqlens=torch.tensor([0, 8], device=DEVICE))
    with pytest.raises(ValueError, match="pass positions or cu_seqlens, not both"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 8]), positions=torch.arange(8))
    assert torch.equal(x, x0), "input changed although the call raised"


# ---------------------------------------------------------------------------------------------
# Packed QKV
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rope_qkv_(backend, dtype, packed):
    Hq, Hkv, D = 4, 2, 64
    shape = (11, Hq + 2 * Hkv, D) if packed else (2, 6, Hq + 2 * Hkv, D)
    qkv = torch.randn(*shape, device=DEVICE, dtype=dtype)
    cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(64)[0].to(DEVICE))
    kw = dict(cu_seqlens=torch.tensor([0, 4, 11], device=DEVICE)) if packed else dict(offsets=3)
    want_q, want_k = pk.apply_rope(qkv[..., :Hq, :], qkv[..., Hq : Hq + Hkv, :], cos, sin, **kw)
    v0 = qkv[..., Hq + Hkv :, :].clone()
    out = pk.apply_rope_qkv_(qkv, cos, sin, num_heads_q=Hq, num_heads_kv=Hkv, **kw)
    assert out is qkv
    assert torch.equal(qkv[..., :Hq, :], want_q) and torch.equal(qkv[..., Hq : Hq + Hkv, :], want_k)
    assert torch.equal(qkv[..., Hq + Hkv :, :], v0), "v heads changed"


def test_apply_rope_qkv_gradients_and_errors(backend):
    Hq, Hkv, D = 2, 1, 16
    w = torch.randn(D * 3, (Hq + 2 * Hkv) * D, device=DEVICE, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, D * 3, device=DEVICE, dtype=torch.float64)
    cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(D)[0].to(DEVICE), dtype=torch.float64)

    def ours(w):
        qkv = (x @ w).view(2, 5, Hq + 2 * Hkv, D)
        return pk.apply_rope_qkv_(qkv, cos, sin, num_heads_q=Hq, num_heads_kv=Hkv)

    def theirs(w):
        qkv = (x @ w).view(2, 5, Hq + 2 * Hkv, D)
        q, k = ref.rope_reference(qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], cos, sin)
        return torch.cat((q, k, qkv[:, :, Hq + Hkv :]), dim=2)

    g = torch.randn(2, 5, Hq + 2 * Hkv, D, device=DEVICE, dtype=torch.float64)
    (ga,) = torch.autograd.grad((ours(w) * g).sum(), w)
    (gb,) = torch.autograd.grad((theirs(w) * g).sum(), w)
    assert max_err(ga, gb) < 1e-10
    qkv = torch.randn(2, 5, 5, D, device=DEVICE)
    with pytest.raises(ValueError, match=r"qkv must have Hq \+ 2\*Hkv = 2 \+ 2\*1 = 4 heads"):
        pk.apply_rope_qkv_(qkv, cos.float(), sin.float(), num_heads_q=2, num_heads_kv=1)
    with pytest.raises(ValueError, match="num_heads_kv must be a positive int"):
        pk.apply_rope_qkv_(qkv, cos.float(), sin.float(), num_heads_q=5, num_heads_kv=0)


# ---------------------------------------------------------------------------------------------
# Multi-axis positions: M-RoPE (Qwen2-VL sectioned, Qwen3-VL interleaved), 2-D axial
# ---------------------------------------------------------------------------------------------


def _hf_mrope_tables(cos_table, sin_table, pos3, section, interleaved):
    """Literal transcription of HF's Qwen2-VL / Qwen3-VL recomposition of per-axis tables -> [B, S, half]."""
    c = cos_table[pos3]  # [3, B, S, half]
    s = sin_table[pos3]

    def recompose(f):
        if not interleaved:
            return torch.cat([m[i % 3] for i, m in enumerate(f.split(section, dim=-1))], dim=-1)
        out = f[0].clone()
        for dim, offset in enumerate((1, 2), start=1):
            idx = slice(offset, section[dim] * 3, 3)
            out[..., idx] = f[dim, ..., idx]
        return out

    return recompose(c), recompose(s)


@pytest.mark.parametrize("angles", ["table", "on_the_fly"])
@pytest.mark.parametrize("interleaved_sections", [False, True])
def test_mrope_matches_hf_recomposition(backend, interleaved_sections, angles):
    section = [24, 20, 20] if interleaved_sections else [16, 24, 24]
    half = sum(section)
    B, S = 2, 9
    inv, _ = pk.rope_frequencies(2 * half, 1000000.0)
    cos, sin = pk.rope_cos_sin(64, inv)
    pos3 = torch.randint(0, 64, (3, B, S))
    c, s = _hf_mrope_tables(cos, sin, pos3, section, interleaved_sections)  # [B, S, half]
    # Each token gets its own table row: rows = arange, tables = the recomposed ones.
    rows = torch.arange(B * S).view(B, S)
    q, k = qk(B, S, 4, 2, 2 * half)
    truth_q = rotate_with_rows(q, c.reshape(B * S, half).to(DEVICE), s.reshape(B * S, half).to(DEVICE), rows.to(DEVICE))
    truth_k = rotate_with_rows(k, c.reshape(B * S, half).to(DEVICE), s.reshape(B * S, half).to(DEVICE), rows.to(DEVICE))
    axis_map = pk.mrope_axis_map(section, interleaved=interleaved_sections, device=DEVICE)
    if angles == "table":
        out_q, out_k = pk.apply_rope(q, k, cos.to(DEVICE), sin.to(DEVICE), positions=pos3.to(DEVICE), axis_map=axis_map)
    else:
        out_q, out_k = pk.apply_rope(q, k, inv_freq=inv.to(DEVICE), positions=pos3.to(DEVICE), axis_map=axis_map)
    assert max_err(out_q, truth_q) < 1e-5 and max_err(out_k, truth_k) < 1e-5
    # Text tokens: three equal axes give plain 1-D RoPE.
    same_pos = pos3[:1].expand(3, B, S).to(DEVICE)
    plain, _ = pk.apply_rope(q, None, cos.to(DEVICE), sin.to(DEVICE), positions=pos3[0].to(DEVICE))
    multi, _ = pk.apply_rope(q, None, cos.to(DEVICE), sin.to(DEVICE), positions=same_pos, axis_map=axis_map)
    same(plain, multi, backend)


def test_axial_2d_rope_for_patches(backend):
    """2-D axial RoPE: half the frequencies follow the patch row, half the column (as Pixtral-style vision
    encoders): equal to rotating the two channel groups with 1-D RoPE by row and by column."""
    Hp, Wp, D = 3, 4, 32
    pos = pk.axial_positions(Hp, Wp, device=DEVICE)  # [2, 12]
    inv, _ = pk.rope_frequencies(D)
    inv = inv.to(DEVICE)
    axis_map = pk.mrope_axis_map([D // 4, D // 4], device=DEVICE)
    x = torch.randn(1, Hp * Wp, 2, D, device=DEVICE)
    out, _ = pk.apply_rope(x, None, inv_freq=inv, positions=pos, axis_map=axis_map)
    angle = torch.cat([pos[0][:, None].float() * inv[: D // 4], pos[1][:, None].float() * inv[D // 4 :]], dim=-1)
    rows = torch.arange(Hp * Wp, device=DEVICE)[None]
    truth = rotate_with_rows(x, angle.cos(), angle.sin(), rows)
    assert max_err(out, truth) < 1e-5


def test_mrope_gradients_and_errors(backend):
    section = [2, 1, 1]
    axis_map = pk.mrope_axis_map(section, device=DEVICE)
    cos, sin = pk.rope_cos_sin(10, pk.rope_frequencies(8)[0].to(DEVICE), dtype=torch.float64)
    pos = torch.randint(0, 10, (3, 2, 3), device=DEVICE)
    q = torch.randn(2, 3, 2, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q: pk.apply_rope(q, None, cos, sin, positions=pos, axis_map=axis_map)[0], (q,))
    x = torch.randn(2, 3, 2, 8, device=DEVICE)
    x0 = x.clone()
    with pytest.raises(ValueError, match=r"axis_map must have one entry per frequency, \[R/2\] = \[4\]"):
        pk.apply_rope_(x, None, cos.float(), sin.float(), positions=pos, axis_map=pk.mrope_axis_map([2, 2, 1]))
    with pytest.raises(ValueError, match=r"axis_map values must lie in \[0, 3\)"):
        pk.apply_rope_(x, None, cos.float(), sin.float(), positions=pos, axis_map=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="axis_map needs positions"):
        pk.apply_rope_(x, None, cos.float(), sin.float(), axis_map=axis_map)
    with pytest.raises(ValueError, match=r"with axis_map, positions must be \[A, S\]"):
        pk.apply_rope_(x, None, cos.float(), sin.float(), positions=pos[:, :, :2], axis_map=axis_map)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 10\)"):
        pk.apply_rope_(x, None, cos.float(), sin.float(), positions=pos + 10, axis_map=axis_map)
    with pytest.raises(ValueError, match="mrope_section must be non-negative ints"):
        pk.mrope_axis_map([])
    assert torch.equal(x, x0)


# ---------------------------------------------------------------------------------------------
# Ops, gradients, compile for the new modes
# ---------------------------------------------------------------------------------------------


def test_gradients_on_the_fly_and_varlen(backend):
    inv64, _ = pk.rope_frequencies(8, dtype=torch.float64)
    inv64 = inv64.to(DEVICE)
    q = torch.randn(7, 2, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 1, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 7], device=DEVICE)
    for kw in (dict(inv_freq=inv64, exact=True), dict(inv_freq=inv64, attention_factor=0.5)):
        torch.autograd.gradcheck(lambda q, k: pk.apply_rope(q, k, cu_seqlens=cu, **kw), (q, k))
        q2, k2 = q.detach().clone(), k.detach().clone()
        q2.requires_grad_(), k2.requires_grad_()
        a, b = q2 * 1, k2 * 1
        pk.apply_rope_(a, b, cu_seqlens=cu, **kw)
        (a.sum() + (b * 2).sum()).backward()
        qq = q.detach().clone().requires_grad_()
        kk = k.detach().clone().requires_grad_()
        oa, ob = pk.apply_rope(qq, kk, cu_seqlens=cu, **kw)
        (oa.sum() + (ob * 2).sum()).backward()
        assert max_err(q2.grad, qq.grad) < 1e-12 and max_err(k2.grad, kk.grad) < 1e-12


def test_opcheck_new_modes(backend):
    inv, _ = pk.rope_frequencies(16)
    inv = inv.to(DEVICE)
    inv64 = pk.rope_frequencies(16, dtype=torch.float64)[0].to(DEVICE)
    cos, sin = pk.rope_cos_sin(20, inv)
    x = torch.randn(9, 3, 16, device=DEVICE)
    k = torch.randn(9, 1, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 9], device=DEVICE)
    pos3 = torch.randint(0, 20, (3, 1, 9), device=DEVICE)
    amap = pk.mrope_axis_map([4, 2, 2], device=DEVICE)
    cases = [
        (x.clone(), k.clone(), None, None, inv, None, None, 0, cu, None, 1.5, False, False, False),
        (x.clone(), k.clone(), None, None, inv64, None, torch.tensor([3, 5], device=DEVICE), 0, cu, None, 1.0, True, False, True),
        (x.clone()[None], k.clone()[None], cos, sin, None, pos3, None, 0, None, amap, 1.0, False, True, False),
    ]  # fmt: skip
    for args in cases:
        torch.library.opcheck(torch.ops.posenc.rope_.default, args)
        torch.library.opcheck(torch.ops.posenc.rope.default, args)


def test_compile_fullgraph_varlen_on_the_fly():
    inv, _ = pk.rope_frequencies(32)
    inv = inv.to(DEVICE)
    cu = torch.tensor([0, 3, 8], device=DEVICE)

    def f(x, y):
        q = x * 2
        k = y + 1
        pk.apply_rope_(q, k, inv_freq=inv, cu_seqlens=cu, offsets=torch.tensor([5, 0], device=DEVICE))
        return q, k

    x, y = torch.randn(8, 4, 32, device=DEVICE), torch.randn(8, 2, 32, device=DEVICE)
    want = f(x, y)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_backward_skips_the_value_checks_forward_did(monkeypatch):
    """The value checks (a host sync on CUDA) run once per forward, never again in backward: backward
    rotates with the very tensors forward checked."""
    import posenc_kernels.ops.rope.op as rope

    calls = []
    real = rope.check_position_values
    monkeypatch.setattr(rope, "check_position_values", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(16)[0].to(DEVICE))
    pos = torch.randint(0, 16, (2, 5), device=DEVICE)
    q = torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True)
    out, _ = pk.apply_rope(q, None, cos, sin, positions=pos)
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) == 1, "backward re-checked position values"
    x = q.detach() * 1
    x.requires_grad_()
    y = x * 2
    pk.apply_rope_(y, None, cos, sin, positions=pos)
    y.sum().backward()
    assert len(calls) == 2
    with pytest.raises(ValueError, match="positions must lie in"):  # the checks still run in forward
        pk.apply_rope(q, None, cos, sin, positions=pos + 16)


def test_eager_calls_keep_autograd_and_dispatch_semantics(backend):
    """Eager calls without autograd go through the dispatcher like any other: the write bumps version
    counters (so autograd catches a rotated tensor that a graph saved), and dispatch modes / subclasses
    see the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(16)[0].to(DEVICE))
    q, k = torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 4, 1, 16, device=DEVICE)
    vq, vk = q._version, k._version
    pk.apply_rope_(q, k, cos, sin)
    assert q._version > vq and k._version > vk
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    y = q * w  # saves q for backward
    pk.apply_rope_(q, None, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        pk.apply_rope_(q, k, cos, sin)
        pk.apply_rope(q, k, cos, sin)
    assert "posenc.rope_.default" in mode.ops and "posenc.rope.default" in mode.ops


def test_review_fixes_strided_metadata_and_guards(backend):
    """Strided cu_seqlens and axis_map are read through their strides; tables that require grad, meta
    tensors, jit tracing and inference tensors are handled explicitly."""
    cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(16)[0].to(DEVICE))
    q = torch.randn(12, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 99, 3, 99, 7, 99, 12, 99], dtype=torch.int32, device=DEVICE)[::2]
    want, _ = pk.apply_rope(q, None, cos, sin, cu_seqlens=cu.contiguous())
    got, _ = pk.apply_rope(q, None, cos, sin, cu_seqlens=cu)
    assert torch.equal(got, want)
    am = pk.mrope_axis_map([4, 2, 2], device=DEVICE)
    am_strided = torch.stack([am, am], 1)[:, 0]
    pos = torch.randint(0, 16, (3, 2, 5), device=DEVICE)
    x = torch.randn(2, 5, 2, 16, device=DEVICE)
    want, _ = pk.apply_rope(x, None, cos, sin, positions=pos, axis_map=am)
    got, _ = pk.apply_rope(x, None, cos, sin, positions=pos, axis_map=am_strided)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cos requires grad"):
        pk.apply_rope(x, None, cos.clone().requires_grad_(), sin)
    with torch.no_grad():  # no gradient is being recorded: fine
        pk.apply_rope(x, None, cos.clone().requires_grad_(), sin)
    with torch.inference_mode():
        inf = torch.randn(2, 5, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="inference tensor"):
        pk.apply_rope_(inf, None, cos, sin)
    with torch.inference_mode():
        pk.apply_rope_(inf, None, cos, sin)
    meta = torch.empty(2, 5, 2, 16, device="meta")
    out, _ = pk.apply_rope(meta, None, cos.to("meta"), sin.to("meta"), positions=pos[0].to("meta"))
    assert out.shape == meta.shape and out.device.type == "meta"
    traced = torch.jit.trace(lambda t: pk.apply_rope(t, None, cos, sin)[0], (x,), check_trace=False)
    assert "posenc::rope" in str(traced.graph)


def test_from_config_interleaved_model_types():
    from transformers import CohereConfig, GlmConfig

    glm = GlmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=1)
    assert pk.RotaryEmbedding.from_config(glm).interleaved
    coh = CohereConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    assert pk.RotaryEmbedding.from_config(coh).interleaved


def test_forward_mode_ad_is_an_error_not_a_dropped_tangent():
    import torch.autograd.forward_ad as fwAD

    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(16)[0].to(DEVICE))
    with fwAD.dual_level():
        q = fwAD.make_dual(torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 4, 2, 16, device=DEVICE))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            pk.apply_rope(q, None, cos, sin)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            pk.apply_rope_(q * 1, None, cos, sin)
