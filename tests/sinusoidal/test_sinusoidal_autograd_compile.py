"""add_sinusoidal(_): gradients, gradcheck, in-place autograd rules, opcheck, torch.compile.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

from conftest import DEVICE, max_err
from .common import CONV

NATIVE_OP = "add_sinusoidal_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Autograd, ops, compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_gradients(backend, inplace):
    xw = torch.randn(2, 6, 12, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 6, 12, device=DEVICE)
    x = xw * 1.0
    out = (pk.add_sinusoidal_ if inplace else pk.add_sinusoidal)(x, x_scale=3.0, offsets=2)
    (gx,) = torch.autograd.grad(out, xw, g)
    x64 = xw.detach().double().requires_grad_()
    (tx,) = torch.autograd.grad(ref.add_sinusoidal_reference(x64, x_scale=3.0, offsets=2), x64, g.double())
    assert max_err(gx, tx) < 1e-6


def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pos = torch.tensor([0.5, 3.0, 7.0], dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda x: pk.add_sinusoidal(x, positions=pos, x_scale=1.5), (x,))
    assert torch.autograd.gradcheck(lambda x: pk.add_sinusoidal_(x * 1.0, x_scale=-2.0, offsets=4), (x,))


def test_inplace_autograd_rules(backend):
    leaf = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        pk.add_sinusoidal_(leaf)
    t = torch.randn(2, 3, 4, device=DEVICE)
    v = t._version
    pk.add_sinusoidal_(t)
    assert t._version > v


def test_opcheck(backend):
    x = torch.randn(2, 5, 12, device=DEVICE)
    pos = torch.randint(0, 100, (2, 5), device=DEVICE)
    offs = torch.tensor([3, 9], device=DEVICE)
    torch.library.opcheck(torch.ops.posenc.add_sinusoidal_.default, (x.clone(), pos, None, 0, 2.0, 1e4, True, False, 0.0, 1.0))
    torch.library.opcheck(torch.ops.posenc.add_sinusoidal_.default, (x.clone(), None, offs, 0, 1.0, 1e4, False, True, 1.0, 2.0))
    torch.library.opcheck(
        torch.ops.posenc.add_sinusoidal.default, (x.clone().requires_grad_(), None, None, 7, 2.0, 1e4, True, False, 0.0, 1.0)
    )
    torch.library.opcheck(
        torch.ops.posenc.sinusoidal_table.default, (pos.float(), 0, 9, 1e4, False, True, 1.0, 1.0, torch.float16, DEVICE)
    )
    torch.library.opcheck(
        torch.ops.posenc.sinusoidal_table.default, (None, 7, 8, 1e4, True, False, 0.0, 1.0, torch.float32, DEVICE)
    )


def _embed(x, t):
    h = pk.add_sinusoidal(x, x_scale=2.0, offsets=1)
    h = h * 1.0
    pk.add_sinusoidal_(h, positions=t)
    return h + pk.sinusoidal_table(t, x.shape[-1], **CONV["diffusers"]).to(h.dtype)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 16, device=DEVICE, requires_grad=True)
    t = torch.rand(4, device=DEVICE) * 100
    eager = _embed(x, t)
    g = torch.randn_like(eager)
    (ge,) = torch.autograd.grad(eager, x, g)
    out = torch.compile(_embed, fullgraph=True, backend=compile_backend)(x, t)
    (gc,) = torch.autograd.grad(out, x, g)
    assert max_err(out, eager) < 1e-5 and max_err(gc, ge) < 1e-6


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_inplace_on_a_leaf_clone_matches_eager(backend, dynamic):
    """``f(x): add_sinusoidal_(x); return x`` on ``leaf.clone()``, compiled (aot_eager, fullgraph): values
    and the gradient reaching the leaf (x_scale * g) as in eager."""

    def f(x, offs):
        pk.add_sinusoidal_(x, offsets=offs, x_scale=3.0, **CONV["fairseq"])
        return x

    leaf = torch.randn(2, 5, 12, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 5, 12, device=DEVICE)
    offs = torch.tensor([4, 1], device=DEVICE)
    eager_leaf = leaf.detach().clone().requires_grad_()
    want = f(eager_leaf.clone(), offs)
    want.backward(g)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)(leaf.clone(), offs)
    got.backward(g)
    assert max_err(got, want) < 1e-5
    assert torch.allclose(leaf.grad, eager_leaf.grad) and torch.allclose(leaf.grad, 3.0 * g)
