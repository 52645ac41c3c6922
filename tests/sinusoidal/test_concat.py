"""concat_sinusoidal: values, gradients, opcheck, compile, bad input.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

from conftest import DEVICE, DTYPES, assert_dtype_tolerance, max_err
from .common import CONV

NATIVE_OP = "add_sinusoidal_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Concatenation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,dim_pe,kw",
    [
        ((2, 7, 12), 8, {}),
        ((11, 6), 5, dict(offsets=3, **CONV["fairseq"])),
        ((3, 4, 16), 16, dict(offsets="tensor", interleaved=False, cos_first=True)),
        ((2, 5, 8), 6, dict(positions="float", **CONV["diffusers"])),
    ],
)
def test_concat_values(backend, shape, dim_pe, kw, dtype):
    kw = dict(kw)
    if kw.get("offsets") == "tensor":
        kw["offsets"] = torch.tensor([0, 9, 2], device=DEVICE)
    if kw.get("positions") == "float":
        kw["positions"] = torch.rand(shape[1], device=DEVICE) * 500
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    out = pk.concat_sinusoidal(x, dim_pe, **kw)
    assert out.shape == shape[:-1] + (shape[-1] + dim_pe,) and out.dtype == dtype
    truth = ref.concat_sinusoidal_reference(x, dim_pe, **kw)
    same_in_torch = ref.concat_sinusoidal_reference(x, dim_pe, dtype=torch.float32, **kw).to(dtype)
    assert_dtype_tolerance(out, truth, same_in_torch)
    assert torch.equal(out[..., : shape[-1]], x), "x must be copied exactly"


def test_concat_grad_opcheck_compile(backend):
    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 5, 14, device=DEVICE)
    (gx,) = torch.autograd.grad(pk.concat_sinusoidal(x, 6, offsets=2), x, g)
    assert torch.equal(gx, g[..., :8])
    x64 = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pk.concat_sinusoidal(t, 4), (x64,))
    torch.library.opcheck(
        torch.ops.posenc.concat_sinusoidal.default, (x.detach().clone().requires_grad_(), None, None, 3, 6, 1e4, True, False, 0.0, 1.0)
    )
    torch._dynamo.reset()
    fn = torch.compile(lambda t: pk.concat_sinusoidal(t * 2, 6).sum(-1), fullgraph=True, backend="aot_eager")
    assert max_err(fn(x), pk.concat_sinusoidal(x * 2, 6).sum(-1)) < 1e-5


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(dim_pe=0), ValueError, "dim_pe must be a positive int"),
        (dict(dim_pe=2, freq_shift=1.0), ValueError, "divides by zero"),
        (dict(dim_pe=4, offsets=torch.zeros(3, dtype=torch.long)), ValueError, r"offsets must have shape \[B\]"),
        (dict(dim_pe=4, x=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    ],
)
def test_concat_bad_input(kwargs, exc, msg):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", torch.zeros(2, 3, 4))
    with pytest.raises(exc, match=msg):
        pk.concat_sinusoidal(x, **kwargs)
