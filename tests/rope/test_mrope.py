"""Multi-axis RoPE (M-RoPE, Qwen2-VL/Qwen3-VL; 2-D axial for image patches): per-frequency axis rows.
"""

import pytest
import torch

import posenc_kernels as pk

import positions_oracle as po
from conftest import DEVICE, gradcheck_kw, max_err
from .common_modes import qk, same, rotate_with_rows

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


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
    # The same truth from the position oracle: frequency i at the position of axis axis_map[i].
    assert axis_map.tolist() == po.axis_map(section, interleaved=interleaved_sections)
    pf = po.as_tensor(po.per_frequency_positions(pos3, po.axis_map(section, interleaved=interleaved_sections)))
    angle = pf.double() * inv.double()  # [B, S, half]
    oracle_q = rotate_with_rows(q, angle.cos().reshape(B * S, half).to(DEVICE), angle.sin().reshape(B * S, half).to(DEVICE),
                                rows.to(DEVICE))  # fmt: skip
    assert max_err(out_q, oracle_q) < 1e-5
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
    torch.autograd.gradcheck(lambda q: pk.apply_rope(q, None, cos, sin, positions=pos, axis_map=axis_map)[0], (q,), **gradcheck_kw(backend))
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
