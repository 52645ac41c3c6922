"""RoPE with angles computed in the kernel (inv_freq instead of cos/sin tables): equal to the table
path, HF's numerics, exact angles at far positions.
"""

import math

import pytest
import torch

import posenc_kernels as pk

from conftest import DEVICE, DTYPES, gradcheck_kw, max_err
from .common_modes import qk, same


NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


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
# Ops, gradients, compile for the new modes
# ---------------------------------------------------------------------------------------------


def test_gradients_on_the_fly_and_varlen(backend):
    inv64, _ = pk.rope_frequencies(8, dtype=torch.float64)
    inv64 = inv64.to(DEVICE)
    q = torch.randn(7, 2, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 1, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 7], device=DEVICE)
    for kw in (dict(inv_freq=inv64, exact=True), dict(inv_freq=inv64, attention_factor=0.5)):
        torch.autograd.gradcheck(lambda q, k: pk.apply_rope(q, k, cu_seqlens=cu, **kw), (q, k), **gradcheck_kw(backend))
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
