"""The op-pair call path (posenc_kernels/ops/pair.py) refuses what it cannot differentiate, before anything
is written, instead of returning a silent zero tangent or a None gradient: forward-mode AD through every
pair (sinusoidal and learned used to return zero tangents), and a gradient asked of an argument the op does
not differentiate (a float ``positions`` of the sinusoidal add, RoPE's tables)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import posenc_kernels as pk


def _rope(inplace):
    cos, sin = pk.rope_cos_sin(4, pk.rope_frequencies(8)[0])
    f = pk.apply_rope_ if inplace else pk.apply_rope
    return lambda x: f(x, None, cos, sin)[0]


CALLS = {
    "apply_rope_": _rope(True),
    "apply_rope": _rope(False),
    "add_sinusoidal_": lambda x: pk.add_sinusoidal_(x[0], x_scale=3.0),
    "add_sinusoidal": lambda x: pk.add_sinusoidal(x[0], x_scale=3.0),
    "add_position_embedding_": lambda x: pk.add_position_embedding_(x[0, :, 0], torch.ones(8, 8), torch.arange(4)),
    "add_position_embedding": lambda x: pk.add_position_embedding(x[0, :, 0], torch.ones(8, 8), torch.arange(4)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_forward_ad_is_refused_before_any_write(name):
    x = torch.randn(1, 4, 2, 8)
    x0 = x.clone()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD is not supported by posenc::"):
            CALLS[name](dual)
    assert torch.equal(x, x0), "nothing may be written before the error"


def test_a_gradient_the_op_does_not_give_is_refused():
    x = torch.randn(2, 5, 8)
    x0 = x.clone()
    t = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], requires_grad=True)  # diffusion-style float positions
    for fn in (pk.add_sinusoidal_, pk.add_sinusoidal):
        with pytest.raises(ValueError, match="positions requires grad, but posenc::add_sinusoidal gives gradients "
                                             "for x only"):  # fmt: skip
            fn(x, positions=t)
    assert torch.equal(x, x0)
    cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(8)[0])
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="cos requires grad, but posenc::rope gives gradients for q and k only"):
        pk.apply_rope(q, None, cos.requires_grad_(), sin)
