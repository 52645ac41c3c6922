"""qk_norm_rope(_): dq, dk, dq_weight, dk_weight against float64 reference autograd under random upstream
gradients; gradcheck (and gradgradcheck) in float64; deterministic weight gradients; the in-place autograd
rules; the fused-QKV form under autograd; opcheck; torch.compile(fullgraph=True) values and gradients equal
to eager."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.qknorm.reference import qk_norm_rope_reference

from conftest import DEVICE, max_err
from rope.common import tables
from .common import weights

NATIVE_OP = "qk_norm_rope_"


def _leaves(B, S, Hq, Hk, D, norm, dtype=torch.float32):
    q = torch.randn(B, S, Hq, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype, requires_grad=True)
    qw, kw = (w.requires_grad_() for w in weights(Hq, Hk, D, norm, dtype))
    return q, k, qw, kw


@pytest.mark.parametrize("norm,offset,interleaved,R", [("head", 1.0, False, 16), ("heads", 0.0, True, 32)])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_gradients_match_reference_autograd(backend, inplace, norm, offset, interleaved, R):
    B, S, Hq, Hk, D = 2, 5, 4, 2, 32
    q, k, qw, kw = _leaves(B, S, Hq, Hk, D, norm)
    cos, sin = tables(S + 4, R)
    kw_op = dict(norm=norm, weight_offset=offset, interleaved=interleaved, offsets=torch.tensor([0, 3], device=DEVICE))
    gq_up, gk_up = torch.randn(B, S, Hq, D, device=DEVICE), torch.randn(B, S, Hk, D, device=DEVICE)
    if inplace:
        oq, ok = pk.qk_norm_rope_(q * 1.0, k * 1.0, qw, kw, cos, sin, **kw_op)
    else:
        oq, ok = pk.qk_norm_rope(q, k, qw, kw, cos, sin, **kw_op)
    got = torch.autograd.grad((oq, ok), (q, k, qw, kw), (gq_up, gk_up))
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    rq, rk = qk_norm_rope_reference(*leaves64, cos, sin, **kw_op)
    want = torch.autograd.grad((rq, rk), leaves64, (gq_up.double(), gk_up.double()))
    for name, g, w in zip(("dq", "dk", "dq_weight", "dk_weight"), got, want):
        assert g.dtype == torch.float32
        assert max_err(g, w) < 2e-5 * max(1.0, w.abs().max().item()), name


def test_gradcheck_float64(backend):
    """gradcheck (and gradgradcheck: the double backward's differentiable path) in float64, off the Triton
    interpreter, which takes minutes for the hundreds of calls of a numerical Jacobian; the Triton forward
    and backward kernels are compared with float64 reference autograd in
    test_gradients_match_reference_autograd and test_backward_op_backends_agree."""
    if DEVICE.type == "cpu" and (backend == "triton" or (backend == "native" and pk.interpreter_enabled())):
        # (native: the backward op has no C++ kernel, so under the interpreter it runs the Triton one)
        pytest.skip("numerical Jacobians through the Triton interpreter take minutes (see docstring)")
    cos, sin = tables(6, 6, dtype=torch.float64)
    pos = torch.tensor([[4, 0, 2]], device=DEVICE)
    for norm in ("head", "heads"):
        q = torch.randn(1, 3, 2, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
        k = torch.randn(1, 3, 1, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
        qw, kw = (w.requires_grad_() for w in weights(2, 1, 8, norm, torch.float64))

        def out_of_place(q, k, qw, kw):
            return pk.qk_norm_rope(q, k, qw, kw, cos, sin, positions=pos, norm=norm, weight_offset=0.5)

        def in_place(q, k, qw, kw):
            return pk.qk_norm_rope_(q * 1.0, k * 1.0, qw, kw, cos, sin, positions=pos, norm=norm, weight_offset=0.5)

        assert torch.autograd.gradcheck(out_of_place, (q, k, qw, kw))
        assert torch.autograd.gradcheck(in_place, (q, k, qw, kw))
        if norm == "heads":  # double backward through the composite backward
            assert torch.autograd.gradgradcheck(out_of_place, (q, k, qw, kw))


@pytest.mark.parametrize("norm,interleaved,R", [("head", False, 12), ("heads", True, 16)])
def test_backward_op_backends_agree(backend, norm, interleaved, R):
    """posenc::qk_norm_rope_backward (one launch on Triton) in float64 against the float64 reference's
    autograd: partial rotary with padded pairs (R/2 = 6 of 8 lanes), strided upstream grads, weights asked
    for one tensor only."""
    from posenc_kernels.ops.qknorm.op import backward_op
    from posenc_kernels.ops.rope.api import _args

    q, k, qw, kw = (t.detach().double() for t in _leaves(2, 5, 3, 2, 16, norm))
    cos, sin = tables(9, R, dtype=torch.float64)
    up_q = torch.randn(2, 3, 5, 16, dtype=torch.float64, device=DEVICE).transpose(1, 2)  # a strided upstream grad
    up_k = torch.randn(2, 5, 2, 16, dtype=torch.float64, device=DEVICE)
    code = 0 if norm == "head" else 1
    dq, dk, dqw, dkw = backward_op(up_q, up_k, q, k, qw, kw, 1e-6, code, 0.5, True, False,
                                   *_args(cos, sin, None, None, 2, None, None, 1.0, interleaved, False))  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (q, k, qw)]
    rq, rk = qk_norm_rope_reference(*leaves, kw, cos, sin, norm=norm, weight_offset=0.5, offsets=2,
                                    interleaved=interleaved)  # fmt: skip
    want = torch.autograd.grad((rq, rk), leaves, (up_q, up_k))
    for name, g, w in zip(("dq", "dk", "dq_weight"), (dq, dk, dqw), want):
        assert max_err(g, w) < 1e-12 * max(1.0, w.abs().max().item()), name
    assert dkw.numel() == 0  # not asked


def test_weight_gradients_deterministic_and_weightless(backend):
    q, k, qw, kw = _leaves(2, 9, 4, 2, 32, "head")
    cos, sin = tables(12, 32)
    g = [torch.autograd.grad(pk.qk_norm_rope(q, k, qw, kw, cos, sin)[0].square().sum(), (qw, q)) for _ in range(2)]
    assert torch.equal(g[0][0], g[1][0]) and torch.equal(g[0][1], g[1][1])
    # q only, no weights: gradients w.r.t. q only, and the norm's gradient is orthogonal to the normalised x
    (gq,) = torch.autograd.grad(pk.qk_norm_rope(q, None, None, None, cos, sin)[0].sum(), (q,))
    rq, _ = qk_norm_rope_reference(q.detach().double().requires_grad_(), None, None, None, cos, sin)
    assert gq.shape == q.shape and not gq.isnan().any()


def test_inplace_autograd_rules_and_qkv(backend):
    cos, sin = tables(4, 16)
    leaf = torch.randn(1, 4, 2, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        pk.qk_norm_rope_(leaf, None, None, None, cos, sin)
    # Fused QKV under autograd: q and k are views of one base; gradients reach the projection and weights.
    x = torch.randn(2, 4, 16, device=DEVICE, requires_grad=True)
    proj = torch.randn(16, (2 + 2 * 1) * 16, device=DEVICE)
    qw, kw = (w.requires_grad_() for w in weights(2, 1, 16, "head", torch.float32))
    qkv = x @ proj
    pk.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, num_heads_q=2, num_heads_kv=1, head_dim=16)
    up = torch.randn_like(qkv)
    got = torch.autograd.grad(qkv, (x, qw, kw), up)
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in (qw, kw)]
    h = (x64 @ proj.double()).unflatten(-1, (4, 16))
    rq, rk = qk_norm_rope_reference(h[:, :, :2], h[:, :, 2:3], *w64, cos, sin)
    ref_out = torch.cat((rq, rk, h[:, :, 3:]), dim=2).flatten(-2)
    want = torch.autograd.grad(ref_out, (x64, *w64), up.double())
    assert max_err(qkv, ref_out) < 1e-5
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-4 * max(1.0, w.abs().max().item())


def test_opcheck(backend):
    q = torch.randn(2, 3, 4, 16, device=DEVICE)
    k = torch.randn(2, 3, 2, 16, device=DEVICE)
    qw, kw = weights(4, 2, 16, "head", torch.float32)
    cos, sin = tables(8, 16)
    pos = torch.randint(0, 8, (2, 3), device=DEVICE)
    rope_rest = lambda positions, offset, inter: (cos, sin, None, positions, None, offset, None, None, 1.0, inter,
                                                  False, False)  # fmt: skip
    cases = [
        (q.clone(), k.clone(), qw, kw, 1e-6, 0, 0.0, *rope_rest(None, 2, False)),
        (q.clone(), None, None, None, 1e-5, 1, 1.0, *rope_rest(pos, 0, True)),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.posenc.qk_norm_rope_.default, args)
    if backend == "triton" and DEVICE.type == "cpu":
        return  # the registration is backend-independent; the functional op's opcheck takes 20 s interpreted
    hw = torch.randn(4 * 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.posenc.qk_norm_rope.default,
        (q.clone().requires_grad_(), None, hw, None, 1e-6, 1, 1.0, *rope_rest(pos, 0, False)),
    )


def _block(q, k, qw, kw, cos, sin, offsets):
    q = q * 1.0
    k = k * 1.0
    pk.qk_norm_rope_(q, k, qw, kw, cos, sin, offsets=offsets, weight_offset=1.0)
    q2, _ = pk.qk_norm_rope(q, None, None, None, cos, sin, norm="heads", offsets=offsets)
    return torch.einsum("bshd,bthd->bhst", q2[:, :, :2], k.expand(-1, -1, 2, -1))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    if compile_backend == "inductor" and backend != "native" and DEVICE.type == "cpu":
        pytest.skip("inductor treats the op as opaque: run once, on the default CPU backend (native); aot_eager "
                    "runs on every backend")
    torch._dynamo.reset()
    q, k, qw, kw = _leaves(2, 5, 4, 1, 32, "head")
    cos, sin = tables(9, 32)
    offs = torch.tensor([0, 4], device=DEVICE)
    eager = _block(q, k, qw, kw, cos, sin, offs)
    g = torch.randn_like(eager)
    ge = torch.autograd.grad(eager, (q, k, qw, kw), g)
    compiled = torch.compile(_block, fullgraph=True, backend=compile_backend)
    out = compiled(q, k, qw, kw, cos, sin, offs)
    gc = torch.autograd.grad(out, (q, k, qw, kw), g)
    assert max_err(out, eager) < 1e-5
    for a, b in zip(gc, ge):
        assert max_err(a, b) < 1e-4
    with torch.no_grad():
        assert max_err(compiled(q, k, qw, kw, cos, sin, offs), eager) < 1e-5
