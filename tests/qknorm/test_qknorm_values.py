"""qk_norm_rope(_) values: every backend against the float64 reference (dtype-tied tolerance) for norm
"head"/"heads", weight_offset, absent weights and k, partial rotary, interleaved pairs, head_dim 80/96/192,
strided views, every position source and angle mode; NaN-poisoned outputs through the launchers; the vLLM
#51049 bug class (partial NeoX with several heads per program) on its own."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.qknorm.op import _body
from posenc_kernels.ops.qknorm.reference import rms_norm_reference
from posenc_kernels.ops.qknorm.kernel import qk_norm_rope_blocks

from conftest import DEVICE, TRITON_RUNS, max_err
from rope.common import make_qk, tables
from .common import check_qk_norm_rope, weights

NATIVE_OP = "qk_norm_rope_"  # these tests also run on the native C++ CPU kernel when built (conftest.py)


@pytest.mark.parametrize(
    "B,S,Hq,Hk,D,R,norm,offset,interleaved,present",
    [
        (2, 5, 4, 2, 64, 64, "head", 0.0, False, (True, True)),  # Qwen3-style
        (1, 3, 4, 1, 80, 80, "head", 1.0, False, (True, True)),  # head_dim 80, Gemma (1 + w)
        (2, 3, 3, 3, 96, 32, "heads", 0.0, False, (True, True)),  # OLMo 2 style, partial rotary
        (1, 2, 5, 2, 192, 192, "heads", 0.5, True, (True, False)),  # head_dim 192, interleaved, k weightless
        (1, 7, 2, 0, 32, 16, "head", 0.0, True, (False, False)),  # k None, weightless, partial, interleaved
        (1, 1, 1, 1, 16, 2, "heads", 0.0, False, (True, True)),  # one head: head and heads agree in shape
    ],
)
def test_values(backend, B, S, Hq, Hk, D, R, norm, offset, interleaved, present):
    for dtype in (torch.float32, torch.bfloat16):
        for inplace in (True, False):
            q, k = make_qk(B, S, Hq, Hk, D, dtype, hf_layout=inplace)
            qw, kw = weights(Hq, Hk, D, norm, dtype, present=present)
            cos, sin = tables(S + 4, R)
            check_qk_norm_rope(q, k, qw, kw, cos, sin, inplace=inplace, norm=norm, weight_offset=offset,
                               interleaved=interleaved, offsets=3, what=f"{dtype} {inplace}")  # fmt: skip


def test_float16_and_positions(backend):
    q, k = make_qk(2, 4, 4, 2, 32, torch.float16)
    qw, kw = weights(4, 2, 32, "head", torch.float16)
    cos, sin = tables(12, 32)
    pos = torch.tensor([[5, 0, 11, 2], [1, 1, 7, 3]], device=DEVICE)
    check_qk_norm_rope(q, k, qw, kw, cos, sin, inplace=True, positions=pos)
    check_qk_norm_rope(q, k, qw, kw, cos, sin, inplace=False, offsets=torch.tensor([2, 8], device=DEVICE))


def _norm_then_rope(q, k, qw, kw, norm, offset, **rope_kw):
    """float64 norm reference, then the package's own (separately tested) RoPE in float64."""
    qn = rms_norm_reference(q, qw, norm=norm, weight_offset=offset)
    kn = rms_norm_reference(k, kw, norm=norm, weight_offset=offset) if k is not None else None
    return pk.apply_rope(qn, kn, **rope_kw)


@pytest.mark.parametrize("mode", ["cu_seqlens", "inv_freq", "exact", "axis_map"])
def test_rope_modes(backend, mode):
    """Every angle and position source of apply_rope_ reaches the fused op (fp32, against norm reference +
    float64 RoPE: the rotation modes are tested against their own references in tests/rope)."""
    inv, _ = pk.rope_frequencies(32)
    T, Hq, Hk, D = 9, 3, 2, 48
    q = torch.randn(T, Hq, D, device=DEVICE)
    k = torch.randn(T, Hk, D, device=DEVICE)
    qw, kw = weights(Hq, Hk, D, "head", torch.float32)
    if mode == "cu_seqlens":
        kw_rope = dict(inv_freq=inv.to(DEVICE), cu_seqlens=torch.tensor([0, 4, 9], device=DEVICE), offsets=2)
        kw64 = dict(kw_rope, inv_freq=inv.double().to(DEVICE), exact=True)
    elif mode == "inv_freq":
        kw_rope = dict(inv_freq=inv.to(DEVICE), positions=torch.arange(T, device=DEVICE) * 7, attention_factor=1.3)
        kw64 = dict(kw_rope, inv_freq=inv.double().to(DEVICE), exact=True)
    elif mode == "exact":
        kw_rope = dict(inv_freq=inv.double().to(DEVICE), exact=True, offsets=100003)
        kw64 = kw_rope
    else:
        axis = pk.mrope_axis_map([8, 4, 4], device=DEVICE)
        pos = torch.randint(0, 30, (3, T), device=DEVICE)
        cos, sin = tables(30, 32, dtype=torch.float64)
        kw_rope = dict(cos=cos.float(), sin=sin.float(), axis_map=axis, positions=pos)
        kw64 = dict(cos=cos, sin=sin, axis_map=axis, positions=pos)
    out_q, out_k = pk.qk_norm_rope(q, k, qw, kw, **kw_rope)
    want_q, want_k = _norm_then_rope(q.double(), k.double(), qw, kw, "head", 0.0, **kw64)
    tol = 2e-5 if mode != "inv_freq" else 2e-3  # inv_freq: fp32 angles (HF numerics) vs exact ones at pos 56
    assert max_err(out_q, want_q) < tol and max_err(out_k, want_k) < tol


@pytest.mark.skipif(not TRITON_RUNS, reason="needs the Triton kernels (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("norm,inplace", [("head", False), ("heads", True)])
def test_launcher_writes_every_element(norm, inplace):
    """Outputs poisoned with NaN before the Triton launcher writes them: an unwritten element fails (partial
    rotary tail, odd head counts, several token blocks)."""
    from posenc_kernels.ops.qknorm.kernel import qk_norm_rope_triton
    from posenc_kernels.ops.rope.api import _args

    q, k = make_qk(2, 19, 3, 5, 80, torch.float32)
    qw, kw = weights(3, 5, 80, norm, torch.float32)
    cos, sin = tables(24, 48)
    code = 0 if norm == "head" else 1
    rest = (qw, kw, 1e-6, code, 0.0, *_args(cos, sin, None, None, 2, None, None, 1.0, False, False))
    want_q, want_k = pk.qk_norm_rope(q, k, *rest[:2], cos, sin, norm=norm, offsets=2)
    if inplace:
        outs = (q.clone(), k.clone())
        _body(qk_norm_rope_triton, outs, outs[0], outs[1], *rest)
    else:
        outs = (torch.full_like(q, float("nan")), torch.full_like(k, float("nan")))
        _body(qk_norm_rope_triton, outs, q, k, *rest)
    assert not outs[0].isnan().any() and not outs[1].isnan().any()
    assert max_err(outs[0], want_q) < 1e-5 and max_err(outs[1], want_k) < 1e-5


def test_partial_neox_several_heads_per_program(backend):
    """vLLM #51049: partial NeoX rotary with several heads per program corrupted heads 2..N. Every head of a
    program must be normalised and rotated with its own channels (here 8 heads, rotary 16 of 64)."""
    Hq, Hk, D, R = 8, 4, 64, 16
    _, _, block_h, _, _ = qk_norm_rope_blocks(D, R // 2, Hq, Hk, 3, 0, False)
    assert block_h >= 4, "the schedule must put several heads in one program for this test to mean anything"
    q, k = make_qk(1, 3, Hq, Hk, D, torch.float32)
    q[:, :, 1:] *= torch.arange(2.0, Hq + 1, device=DEVICE)[:, None]  # heads differ in scale and content
    qw, kw = weights(Hq, Hk, D, "head", torch.float32)
    cos, sin = tables(8, R)
    check_qk_norm_rope(q, k, qw, kw, cos, sin, inplace=True, offsets=1, what="partial neox")
