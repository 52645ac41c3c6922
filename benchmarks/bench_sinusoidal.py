"""Sinusoidal benchmarks: add_sinusoidal_ (x <- x * x_scale + PE, one pass) vs eager PyTorch.

Bytes are the minimal traffic: x read and written once (the encodings are computed in the kernel).
"""

import math

import pytest
import torch

import posenc_kernels as pk

from _harness import DEVICE, IS_CUDA, run

if IS_CUDA:
    CASES = [((8, 4096, 4096), torch.bfloat16), ((1, 4096, 1024), torch.bfloat16), ((64, 1024, 512), torch.float32)]
else:
    CASES = [((4, 1024, 1024), torch.float32), ((4, 1024, 1024), torch.bfloat16)]

PROVIDERS = ["posenc_inplace", "posenc_outofplace", "eager_buffer", "eager_buffer_compiled", "eager_compute"]

_compiled = None


def _eager_buffer(x, pe, x_scale):
    # The usual module: a precomputed table buffer (already in x's dtype), sliced and added.
    return x * x_scale + pe[: x.shape[1]]


def _eager_compute(x, x_scale):
    # Computing the table in every call, as timestep embeddings do.
    S, D = x.shape[1], x.shape[2]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv
    pe = torch.stack((ang.sin(), ang.cos()), -1).flatten(-2)
    return x * x_scale + pe.to(x.dtype)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + str(c[1]).replace("torch.", ""))
def test_add_sinusoidal(benchmark, case, provider):
    global _compiled
    shape, dtype = case
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    scale = math.sqrt(shape[-1])
    if provider == "posenc_inplace":
        fn = lambda: pk.add_sinusoidal_(x, x_scale=scale)  # noqa: E731
    elif provider == "posenc_outofplace":
        fn = lambda: pk.add_sinusoidal(x, x_scale=scale)  # noqa: E731
    elif provider == "eager_compute":
        fn = lambda: _eager_compute(x, scale)  # noqa: E731
    else:
        pe = pk.sinusoidal_table(shape[1], shape[2]).to(device=DEVICE, dtype=dtype)
        if provider == "eager_buffer":
            fn = lambda: _eager_buffer(x, pe, scale)  # noqa: E731
        else:
            if _compiled is None:
                _compiled = torch.compile(_eager_buffer, dynamic=False)
            fn = lambda: _compiled(x, pe, scale)  # noqa: E731
    run(benchmark, fn, op="add_sinusoidal_", shape=f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}",
        provider=provider, nbytes=2 * x.nbytes)  # fmt: skip


def _eager_concat(x, pe):
    return torch.cat((x, pe[: x.shape[1]].expand(x.shape[0], -1, -1)), dim=-1)


_compiled_concat = None


@pytest.mark.parametrize("provider", ["posenc", "eager_buffer", "eager_buffer_compiled"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + str(c[1]).replace("torch.", ""))
def test_concat_sinusoidal(benchmark, case, provider):
    """The concatenation alternative, dim_pe = D/4: bytes are x read once plus the wider output written."""
    global _compiled_concat
    shape, dtype = case
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    dim_pe = shape[-1] // 4
    nbytes = x.nbytes + x.nbytes * (shape[-1] + dim_pe) // shape[-1]
    if provider == "posenc":
        fn = lambda: pk.concat_sinusoidal(x, dim_pe)  # noqa: E731
    else:
        pe = pk.sinusoidal_table(shape[1], dim_pe).to(device=DEVICE, dtype=dtype)
        if provider == "eager_buffer":
            fn = lambda: _eager_concat(x, pe)  # noqa: E731
        else:
            if _compiled_concat is None:
                _compiled_concat = torch.compile(_eager_concat, dynamic=False)
            fn = lambda: _compiled_concat(x, pe)  # noqa: E731
    run(benchmark, fn, op="concat_sinusoidal", shape=f"{'x'.join(map(str, shape))}+{dim_pe} {str(dtype).replace('torch.', '')}",
        provider=provider, nbytes=nbytes)  # fmt: skip
