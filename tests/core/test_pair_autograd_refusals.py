"""The op-pair call path (posenc_kernels/ops/pair.py) refuses what it cannot differentiate, before anything
is written, instead of returning a silent zero tangent or a None gradient: forward-mode AD w.r.t. an argument
no formula covers (RoPE's tables), and a gradient asked of an argument the op does not differentiate."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import posenc_kernels as pk


@pytest.mark.parametrize("inplace", [True, False])
def test_forward_ad_without_a_formula_is_refused_before_any_write(inplace):
    """RoPE's jvp is for q and k; a tangent on its tables is refused, naming them, before q is written.
    (Forward AD through the pair ops' differentiable arguments: tests/core/test_autograd_modes.py.)"""
    cos, sin = pk.rope_cos_sin(4, pk.rope_frequencies(8)[0])
    f = pk.apply_rope_ if inplace else pk.apply_rope
    x = torch.randn(1, 4, 2, 8)
    x0 = x.clone()
    with fwAD.dual_level():
        dual = fwAD.make_dual(cos, torch.ones_like(cos))
        with pytest.raises(NotImplementedError, match=r"forward-mode AD is not supported by posenc::rope w\.r\.t\. cos"):
            f(x, None, dual, sin)
    assert torch.equal(x, x0), "nothing may be written before the error"


def test_a_gradient_the_op_does_not_give_is_refused():
    x = torch.randn(2, 5, 8)
    x0 = x.clone()
    offsets = torch.tensor([1.0, 2.0], requires_grad=True)  # not even an index dtype: refused, never None
    for fn in (pk.add_sinusoidal_, pk.add_sinusoidal):
        with pytest.raises((ValueError, TypeError), match="offsets"):
            fn(x, offsets=offsets)
    assert torch.equal(x, x0)
    cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(8)[0])
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="cos requires grad, but posenc::rope gives gradients for q and k only"):
        pk.apply_rope(q, None, cos.requires_grad_(), sin)
