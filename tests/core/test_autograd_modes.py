"""Every autograd mode of every op is right or refused (issue 20, item 1): forward-mode AD
(``torch.func.jvp`` and ``torch.autograd.forward_ad``) against the float64 references' own jvp; double
backward through the table gradients (gradgradcheck); gradients of float positions and of ``inv_freq``
(gradcheck, or the float64 reference where the op computes fp32 angles by contract); and a clear error, never
a silent zero or None, for what no formula covers. Each case runs on every backend (Triton through the
interpreter, torch, and the C++ kernels where the extension has one)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp

import posenc_kernels as pk
from posenc_kernels.ops.learned.reference import add_position_embedding_reference
from posenc_kernels.ops.relative.reference import alibi_bias_reference, t5_relative_bias_reference
from posenc_kernels.ops.rope.reference import rope_cos_sin_reference, rope_reference
from posenc_kernels.ops.sinusoidal.reference import (
    add_sinusoidal_reference, concat_sinusoidal_reference, sinusoidal_table_reference,
)  # fmt: skip

NATIVE_OP = "add_sinusoidal_"  # the native backend too (it has the sinusoidal, learned and RoPE kernels)
F64 = torch.float64
CONV = dict(interleaved=False, cos_first=True, freq_shift=1.0, scale=0.5)  # a non-default convention


def _r(*shape):
    return torch.randn(*shape, dtype=F64)


def _cases():
    """name -> (op, reference, primals): both functions of the same primals, all differentiable."""
    t = torch.tensor([[0.5, 3.25, 7.0], [1.5, 0.0, 11.0]], dtype=F64)  # float positions [B, S]
    table, pos = _r(5, 3), torch.tensor([[0, 3, 4], [4, 4, 1]])
    inv = pk.rope_frequencies(4, dtype=F64)[0]
    cos, sin = pk.rope_cos_sin(3, inv, dtype=F64)
    rows = torch.tensor([1.0, 2.5, 40.0], dtype=F64)
    return {
        "add_sinusoidal": (
            lambda x, t: pk.add_sinusoidal(x, positions=t, x_scale=3.0, **CONV),
            lambda x, t: add_sinusoidal_reference(x, positions=t, x_scale=3.0, **CONV),
            (_r(2, 3, 5), t),
        ),
        "concat_sinusoidal": (
            lambda x, t: pk.concat_sinusoidal(x, 6, positions=t[0]),
            lambda x, t: concat_sinusoidal_reference(x, 6, positions=t[0]),
            (_r(2, 3, 4), t),
        ),
        "sinusoidal_table": (
            lambda t: pk.sinusoidal_table(t, 5, dtype=F64, **CONV),
            lambda t: sinusoidal_table_reference(t, 5, **CONV),
            (t,),
        ),
        "add_position_embedding": (
            lambda x, w: pk.add_position_embedding(x, w, pos),
            lambda x, w: add_position_embedding_reference(x, w, pos),
            (_r(2, 3, 3), table),
        ),
        # padding_idx freezes its row's gradient (nn.Embedding's rule), so the first derivative is not the
        # finite difference there; its double backward and forward AD are checked
        "add_position_embedding(padding_idx)": (
            lambda x, w: pk.add_position_embedding(x, w, pos, padding_idx=4),
            lambda x, w: add_position_embedding_reference(x, w, pos, padding_idx=4),
            (_r(2, 3, 3), table),
        ),
        "t5_relative_bias": (
            lambda w: pk.t5_relative_bias(w, 3, 5, q_offset=2, bidirectional=False, max_distance=8),
            lambda w: t5_relative_bias_reference(w, 3, 5, q_offset=2, bidirectional=False, max_distance=8),
            (_r(6, 2),),
        ),
        "alibi_bias": (
            lambda s: pk.alibi_bias(s, 3, 4, causal=False, dtype=F64),
            lambda s: alibi_bias_reference(s, 3, 4, causal=False),
            (_r(3),),
        ),
        "apply_rope": (
            lambda q, k: pk.apply_rope(q, k, cos, sin, interleaved=True),
            lambda q, k: rope_reference(q, k, cos, sin, interleaved=True),
            (_r(1, 3, 2, 4), _r(1, 3, 1, 4)),
        ),
        "rope_cos_sin": (
            lambda p, f: pk.rope_cos_sin(p, f, dtype=F64, attention_factor=0.7),
            lambda p, f: rope_cos_sin_reference(p, f, 0.7),
            (rows, inv),
        ),
    }


CASES = list(_cases())
# rope_cos_sin forms each angle as one fp32 product by contract (HF's numerics): compared at fp32's resolution.
TOL = {"rope_cos_sin": dict(rtol=1e-5, atol=2e-5)}


def _close(a, b, name):
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    for u, v in zip(a, b):
        torch.testing.assert_close(u.double(), v.double(), **TOL.get(name, dict(rtol=1e-9, atol=1e-9)))


@pytest.mark.parametrize("name", CASES)
def test_forward_ad_matches_the_reference(name, backend):
    op, ref, primals = _cases()[name]
    tangents = tuple(torch.randn_like(p) for p in primals)
    out, tan = jvp(op, primals, tangents)
    ref_out, ref_tan = jvp(ref, primals, tangents)
    _close(out, ref_out, name)
    _close(tan, ref_tan, name)
    # torch.autograd.forward_ad, one tangent at a time: each argument's tangent is its own, none dropped
    for i in range(len(primals)):
        with fwAD.dual_level():
            args = [fwAD.make_dual(p, t) if j == i else p for j, (p, t) in enumerate(zip(primals, tangents))]
            res = op(*args)
            got = tuple(fwAD.unpack_dual(r).tangent for r in (res if isinstance(res, tuple) else (res,)))
        want = jvp(lambda p: ref(*primals[:i], p, *primals[i + 1 :]), (primals[i],), (tangents[i],))[1]
        _close(got if isinstance(res, tuple) else got[0], want, name)


def test_forward_ad_in_place(backend):
    """The in-place twins under forward AD: the out-of-place jvp copied back, tangent included."""
    x, t = _r(2, 3, 7), torch.tensor([0.5, 3.0, 9.0], dtype=F64)
    dx, dt = torch.randn_like(x), torch.randn_like(t)
    cos, sin = pk.rope_cos_sin(3, pk.rope_frequencies(8, dtype=F64)[0], dtype=F64)
    q, dq = _r(1, 3, 2, 8), _r(1, 3, 2, 8)
    table, dtable, pos = _r(4, 7), _r(4, 7), torch.tensor([3, 0, 1])
    with fwAD.dual_level():  # (make_dual keeps the tangent tensor itself, which the in-place op updates)
        xd = fwAD.make_dual(x.clone(), dx.clone())
        pk.add_sinusoidal_(xd, positions=fwAD.make_dual(t, dt), x_scale=2.0)
        got = fwAD.unpack_dual(xd).tangent
        qd = fwAD.make_dual(q.clone(), dq.clone())
        pk.apply_rope_(qd, None, cos, sin)
        got_q = fwAD.unpack_dual(qd).tangent
        xe = x.clone()
        pk.add_position_embedding_(xe, fwAD.make_dual(table, dtable), pos)
        got_e = fwAD.unpack_dual(xe).tangent
    want = jvp(lambda x, t: add_sinusoidal_reference(x, positions=t, x_scale=2.0), (x, t), (dx, dt))[1]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_q, jvp(lambda q: rope_reference(q, None, cos, sin)[0], (q,), (dq,))[1])
    torch.testing.assert_close(got_e, jvp(lambda w: add_position_embedding_reference(x, w, pos), (table,), (dtable,))[1])


@pytest.mark.parametrize("name", ["add_position_embedding", "add_position_embedding(padding_idx)", "t5_relative_bias",
                                  "add_sinusoidal", "concat_sinusoidal", "sinusoidal_table"])  # fmt: skip
def test_gradcheck_and_gradgradcheck(name, backend):
    """Double backward through the table gradients (position_embedding_backward and t5's backward are
    differentiable: their derivative is the forward gather) and through the float-position slopes."""
    op, _, primals = _cases()[name]
    primals = tuple(p.clone().requires_grad_() for p in primals)
    # fast_mode: the Jacobians projected on random vectors (seeded), a few interpreted launches instead of
    # one per input element; a wrong derivative still fails
    if "padding_idx" not in name:
        assert torch.autograd.gradcheck(op, primals, fast_mode=True)
    assert torch.autograd.gradgradcheck(op, primals, fast_mode=True)


def test_rope_cos_sin_gradients_match_the_reference(backend):
    """rope_cos_sin w.r.t. inv_freq and float positions, against float64 autograd of the reference (the op's
    angles are fp32 products by contract, so finite differences in float64 are not the yardstick)."""
    op, ref, (p, f) = _cases()["rope_cos_sin"]
    gc, gs = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    p1, f1, p2, f2 = (v.clone().requires_grad_() for v in (p, f, p, f))
    cos, sin = op(p1, f1)
    assert cos.requires_grad and sin.requires_grad
    got = torch.autograd.grad((cos * gc).sum() + (sin * gs).sum(), (p1, f1))
    rc, rs = ref(p2, f2)
    want = torch.autograd.grad((rc * gc).sum() + (rs * gs).sum(), (p2, f2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_what_no_formula_covers_is_refused_by_name(backend):
    """Tables of RoPE (its formula is for q and k) in either mode, through the public function and the bare
    op: an error naming the argument, never a silent zero tangent or a None gradient."""
    cos, sin = pk.rope_cos_sin(3, pk.rope_frequencies(8)[0])
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(NotImplementedError, match=r"posenc::rope w\.r\.t\. cos"):
        jvp(lambda c: pk.apply_rope(q, None, c, sin)[0], (cos,), (torch.ones_like(cos),))
    with pytest.raises(NotImplementedError, match=r"posenc::rope w\.r\.t\. sin"):
        jvp(lambda s: torch.ops.posenc.rope(q, None, cos, s, None, None, None, 0, None, None, 1.0, False, False,
                                            False)[0], (sin,), (torch.ones_like(sin),))  # fmt: skip
    with pytest.raises(ValueError, match="cos requires grad, but posenc::rope gives gradients for q and k only"):
        torch.ops.posenc.rope(q, None, cos.requires_grad_(), sin, None, None, None, 0, None, None, 1.0, False, False,
                              False)  # fmt: skip
