"""apply_rope(_): gradients against reference autograd, gradcheck in float64, the in-place autograd
rules, opcheck and torch.compile(fullgraph=True).
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

from conftest import DEVICE, gradcheck_kw, max_err
from .common import make_qk, tables

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_gradients_match_reference_autograd(backend, inplace, interleaved):
    B, S, Hq, Hk, D = 2, 6, 4, 2, 32
    qw = torch.randn(B, S, Hq, D, device=DEVICE, requires_grad=True)
    kw_ = torch.randn(B, S, Hk, D, device=DEVICE, requires_grad=True)
    cos, sin = tables(S + 4, 16)
    offsets = torch.tensor([0, 3], device=DEVICE)
    gq_up, gk_up = torch.randn(B, S, Hq, D, device=DEVICE), torch.randn(B, S, Hk, D, device=DEVICE)

    q, k = qw * 1.0, kw_ * 1.0  # non-leaf, so the in-place form is legal
    fn = pk.apply_rope_ if inplace else pk.apply_rope
    oq, ok = fn(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    gq, gk = torch.autograd.grad((oq, ok), (qw, kw_), (gq_up, gk_up))

    q64, k64 = qw.detach().double().requires_grad_(), kw_.detach().double().requires_grad_()
    rq, rk = ref.rope_reference(q64, k64, cos, sin, offsets=offsets, interleaved=interleaved)
    tq, tk = torch.autograd.grad((rq, rk), (q64, k64), (gq_up.double(), gk_up.double()))
    assert max_err(gq, tq) < 1e-5 and max_err(gk, tk) < 1e-5


def test_gradient_with_hf_layout_views(backend):
    """In-place on transposed views of non-leaf tensors: autograd routes the gradient through the view."""
    x = torch.randn(2, 4, 5, 16, device=DEVICE, requires_grad=True)  # [B, H, S, D]
    y = x * 2.0
    q = y.transpose(1, 2)
    cos, sin = tables(5, 16)
    pk.apply_rope_(q, None, cos, sin)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    r, _ = ref.rope_reference((x.detach().double() * 2).transpose(1, 2).requires_grad_(), None, cos, sin)
    assert max_err(y.detach().transpose(1, 2), r) < 1e-5
    # d/dx of rope(2x) = 2 * R^T g
    expect = 2 * ref.rope_reference(g.transpose(1, 2), None, cos, sin, conjugate=True)[0].transpose(1, 2)
    assert max_err(gx, expect) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(backend, interleaved):
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cos, sin = tables(6, 6, dtype=torch.float64)
    pos = torch.tensor([[4, 0, 2]], device=DEVICE)

    def out_of_place(q, k):
        return pk.apply_rope(q, k, cos, sin, positions=pos, interleaved=interleaved)

    def in_place(q, k):
        return pk.apply_rope_(q * 1.0, k * 1.0, cos, sin, positions=pos, interleaved=interleaved)

    assert torch.autograd.gradcheck(out_of_place, (q, k), **gradcheck_kw(backend))
    assert torch.autograd.gradcheck(in_place, (q, k), **gradcheck_kw(backend))
    assert torch.autograd.gradgradcheck(out_of_place, (q, k), **gradcheck_kw(backend))


def test_inplace_follows_autograd_rules(backend):
    cos, sin = tables(4, 8)
    leaf = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        pk.apply_rope_(leaf, None, cos, sin)
    # Version counter: saving a tensor for backward then rotating it in place is caught at backward.
    x = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    y = x * 1.0
    z = (y * y).sum()  # saves y
    v = y._version
    pk.apply_rope_(y, None, cos, sin)
    assert y._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    # Without grad the in-place op bumps the version counter too.
    t = torch.randn(1, 4, 2, 8, device=DEVICE)
    v = t._version
    pk.apply_rope_(t, None, cos, sin)
    assert t._version > v


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


def test_opcheck(backend):
    q, k = make_qk(2, 5, 4, 2, 32, torch.float32)
    cos, sin = tables(8, 16)
    pos = torch.randint(0, 8, (2, 5), device=DEVICE)
    offs = torch.tensor([1, 3], device=DEVICE)
    for args in [
        (q.clone(), k.clone(), cos, sin, None, None, None, 2, None, None, 1.0, False, False, False),
        (q.clone(), None, cos, sin, None, pos, None, 0, None, None, 1.0, True, False, False),
        (q.clone(), k.clone(), cos, sin, None, None, offs, 0, None, None, 1.0, False, True, False),
    ]:
        torch.library.opcheck(torch.ops.posenc.rope_.default, args)
    qg = q.clone().requires_grad_()
    torch.library.opcheck(torch.ops.posenc.rope.default, (qg, k.clone().requires_grad_(), cos, sin, None, pos, None, 0, None, None, 1.0, True, False, False))
    torch.library.opcheck(torch.ops.posenc.rope.default, (qg, None, cos, sin, None, None, offs, 0, None, None, 1.0, False, False, False))
    inv = pk.rope_frequencies(16)[0].to(DEVICE)
    torch.library.opcheck(torch.ops.posenc.rope_cos_sin.default, (pos, inv, 1.0, torch.bfloat16))


def _attention_block(q, k, cos, sin, offsets):
    q = q * 1.0
    k = k * 1.0
    pk.apply_rope_(q, k, cos, sin, offsets=offsets)
    q2, k2 = pk.apply_rope(q, k, cos, sin, offsets=offsets, interleaved=True)
    return torch.einsum("bshd,bthd->bhst", q2[:, :, :2], k2.expand(-1, -1, 2, -1))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    q = torch.randn(2, 5, 4, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 1, 32, device=DEVICE, requires_grad=True)
    cos, sin = tables(9, 32)
    offs = torch.tensor([0, 4], device=DEVICE)
    eager = _attention_block(q, k, cos, sin, offs)
    g = torch.randn_like(eager)
    ge = torch.autograd.grad(eager, (q, k), g)
    compiled = torch.compile(_attention_block, fullgraph=True, backend=compile_backend)
    out = compiled(q, k, cos, sin, offs)
    gc = torch.autograd.grad(out, (q, k), g)
    assert max_err(out, eager) < 1e-5
    assert max_err(gc[0], ge[0]) < 1e-5 and max_err(gc[1], ge[1]) < 1e-5
    # Inference path (no grad): the mutating op under functionalization.
    with torch.no_grad():
        assert max_err(compiled(q, k, cos, sin, offs), eager) < 1e-5
