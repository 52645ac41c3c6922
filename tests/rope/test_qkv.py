"""apply_rope_qkv_: RoPE on the q and k heads of one fused qkv projection.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

from conftest import DEVICE, DTYPES, max_err

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


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
