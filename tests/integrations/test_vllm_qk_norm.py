"""integrations.vllm.fused_qk_norm_rope: vLLM's argument order and semantics (per-head RMSNorm of the q and k
heads of a packed QKV projection, then RoPE from a ``[cos | sin]`` cache by position id, in place, v untouched)
against the float64 reference (``qk_norm_rope_reference``); gradients; bad input named before any write.
"""

import pytest
import torch

from posenc_kernels.integrations import vllm as vllm_int
from posenc_kernels.ops.qknorm.reference import qk_norm_rope_hf_eager, qk_norm_rope_reference

from conftest import assert_dtype_tolerance


def _cache(max_pos, rot_dim, dtype=torch.float32):
    inv = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    angle = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv
    return torch.cat((angle.cos(), angle.sin()), dim=-1).to(dtype)


def _split(qkv, hq, hk, d):
    heads = qkv.unflatten(-1, (-1, d))[None]  # [1, T, H, D]
    return heads[:, :, :hq], heads[:, :, hq : hq + hk], heads[:, :, hq + hk :]


# (T, Hq, Hk, Hv, D, rot_dim, is_neox, dtype): Qwen3-like full NeoX; partial GPT-J pairs with head_dim 80;
# partial NeoX with several heads per program (the vLLM #51049 bug class) and Hv != Hk, in bf16.
CASES = [
    (7, 4, 2, 2, 64, 64, True, torch.float32),
    (5, 3, 1, 1, 80, 32, False, torch.float32),
    (9, 8, 2, 3, 64, 32, True, torch.bfloat16),
]


@pytest.mark.parametrize("T,Hq,Hk,Hv,D,rot,is_neox,dtype", CASES)
def test_matches_reference(T, Hq, Hk, Hv, D, rot, is_neox, dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, (Hq + Hk + Hv) * D, generator=g).to(dtype)
    qw = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype)
    kw = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype)
    cache = _cache(64, rot)
    pos = torch.randint(0, 64, (T,), generator=g)
    before = qkv.clone()
    out = vllm_int.fused_qk_norm_rope(qkv, Hq, Hk, Hv, D, 1e-6, qw, kw, cache, is_neox, pos)
    assert out is qkv
    q0, k0, v0 = _split(before, Hq, Hk, D)
    q1, k1, v1 = _split(qkv, Hq, Hk, D)
    assert torch.equal(v1, v0), "v heads must be untouched"
    half = rot // 2
    cos, sin = cache[:, :half], cache[:, half:]
    kw_ref = dict(eps=1e-6, positions=pos[None], interleaved=not is_neox)
    tq, tk = qk_norm_rope_reference(q0, k0, qw, kw, cos, sin, **kw_ref)
    sq, sk = qk_norm_rope_hf_eager(q0, k0, qw, kw, cos.to(dtype), sin.to(dtype), **kw_ref)
    assert_dtype_tolerance(q1, tq, sq, what="q")
    assert_dtype_tolerance(k1, tk, sk, what="k")


def test_gradients_match_reference():
    T, Hq, Hk, Hv, D, rot = 4, 2, 1, 1, 16, 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, (Hq + Hk + Hv) * D, generator=g, dtype=torch.float64, requires_grad=True)
    qw = torch.rand(D, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    kw = torch.rand(D, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    cache = _cache(16, rot, torch.float64)
    pos = torch.tensor([3, 0, 9, 9])
    up = torch.randn(T, (Hq + Hk + Hv) * D, generator=g, dtype=torch.float64)
    out = vllm_int.fused_qk_norm_rope(x * 1, Hq, Hk, Hv, D, 1e-6, qw, kw, cache, True, pos)
    ours = torch.autograd.grad((out * up).sum(), (x, qw, kw))
    q, k, v = _split(x, Hq, Hk, D)
    tq, tk = qk_norm_rope_reference(q, k, qw, kw, cache[:, : rot // 2], cache[:, rot // 2 :], eps=1e-6,
                                    positions=pos[None])  # fmt: skip
    ref = torch.cat((tq, tk, v), dim=2).reshape(T, -1)
    want = torch.autograd.grad((ref * up).sum(), (x, qw, kw))
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"num_heads_v": 3}, ValueError, r"^qkv must be \[T, \(num_heads_q"),
        ({"cos_sin_cache": _cache(32, 8)[:, :7]}, ValueError, "^cos_sin_cache must be"),
        ({"position_ids": torch.tensor([0, 1])}, ValueError, r"^position_ids must be \[T\]"),
        ({"position_ids": torch.tensor([0, 1, 40, 2, 3])}, ValueError, "^positions must lie in"),
        ({"q_weight": torch.ones(4)}, ValueError, "^q_weight must be"),
        ({"head_dim": 0}, ValueError, "^head_dim must be a positive int"),
        ({"is_neox": 1}, TypeError, "^is_neox must be a bool"),
    ],
)
def test_bad_input_named_before_any_write(change, error, match):
    args = dict(num_heads_q=4, num_heads_k=2, num_heads_v=2, head_dim=8, eps=1e-6, q_weight=torch.ones(8),
                k_weight=torch.ones(8), cos_sin_cache=_cache(32, 8), is_neox=True,
                position_ids=torch.tensor([0, 1, 4, 2, 3]))  # fmt: skip
    args.update(change)
    qkv = torch.randn(5, 8 * 8)
    before = qkv.clone()
    with pytest.raises(error, match=match):
        vllm_int.fused_qk_norm_rope(qkv, **args)
    assert torch.equal(qkv, before), "nothing may be written before the error"
