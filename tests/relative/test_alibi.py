"""ALiBi: slopes (paper and BLOOM), the bias against the reference, layout and sign, causal equivalence
through softmax, every element written, the slope gradient.
"""

import pytest
import torch

import posenc_kernels.reference as ref
from posenc_kernels.ops.relative.kernel import alibi_triton
from posenc_kernels.ops.relative.torch_impl import alibi_torch
from posenc_kernels.ops.relative import alibi_bias, alibi_slopes

from conftest import DEVICE, TRITON_RUNS, assert_dtype_tolerance, max_err, ulp_err
from .common import ALL_DTYPES, SHAPES


# ---------------------------------------------------------------------------------------------
# ALiBi slopes
# ---------------------------------------------------------------------------------------------


def test_slopes_match_paper_and_bloom_for_every_head_count():
    for H in range(1, 81):
        ours = alibi_slopes(H)
        assert ours.dtype == torch.float32 and ours.shape == (H,)
        paper = torch.tensor(ref.alibi_slopes_paper(H), dtype=torch.float64)
        truth = ref.alibi_slopes_reference(H)
        # The paper's float64 sequence (a rounded ratio raised to powers up to 63: <= 8 fp64 ulps measured) is
        # the definition to float64 precision...
        assert torch.allclose(paper, truth, rtol=16 * torch.finfo(torch.float64).eps, atol=0), H
        # ...and rounds to exactly our float32 slopes, which are the float64 truth rounded once.
        assert torch.equal(ours, paper.float()), H
        assert torch.equal(ours, truth.float()), H
        assert torch.equal(alibi_slopes(H, dtype=torch.float64), truth), H
        # BLOOM raises a float32 base to integer powers in float32: a few ulps off; ours is correctly rounded.
        bloom = ref.alibi_slopes_bloom(H)
        assert ulp_err(ours, truth, torch.float32) <= 0.5
        assert_dtype_tolerance(ours, truth, bloom, what=f"H={H}")
        assert (ours.double() - bloom.double()).abs().max() <= 8 * torch.finfo(torch.float32).eps * bloom.abs().max()


def test_slopes_values_of_published_layouts():
    # 8 heads: 1/2 .. 1/256; 12 heads (BLOOM-560m... every non power of two): 8 then the odd powers of 2^-1/2.
    assert torch.equal(alibi_slopes(8), 2.0 ** -torch.arange(1, 9, dtype=torch.float32))
    extra = 2 ** (-0.5 * torch.arange(1, 9, 2, dtype=torch.float64))
    assert torch.equal(alibi_slopes(12)[8:], extra.float())
    assert alibi_slopes(3, device=DEVICE).device.type == DEVICE.type


# ---------------------------------------------------------------------------------------------
# ALiBi bias
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_alibi_bias(backend, shape, causal, dtype):
    Lq, Lk, off = shape
    slopes = alibi_slopes(12, device=DEVICE)
    out = alibi_bias(slopes, Lq, Lk, causal=causal, q_offset=off, dtype=dtype)
    assert out.shape == (12, Lq, Lk) and out.dtype == dtype and out.device.type == DEVICE.type
    truth = ref.alibi_bias_reference(slopes.cpu(), Lq, Lk, causal=causal, q_offset=off)
    if dtype == torch.float64:
        assert max_err(out.cpu(), truth) <= 1e-15 * truth.abs().max().item()
        return
    in_torch = ref.alibi_bias_eager(slopes.cpu(), Lq, Lk, causal=causal, q_offset=off, dtype=dtype)
    assert_dtype_tolerance(out.cpu(), truth, in_torch, what=f"alibi {shape} causal={causal}")


def test_alibi_bias_layout_and_sign(backend):
    s = torch.tensor([0.5, 0.25], device=DEVICE)
    out = alibi_bias(s, 2, 4, q_offset=1).cpu()
    rel = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [-2.0, -1.0, 0.0, 1.0]])  # key j - query (1 + i)
    assert torch.equal(out[0], 0.5 * rel) and torch.equal(out[1], 0.25 * rel)
    sym = alibi_bias(s, 2, 4, q_offset=1, causal=False).cpu()
    assert torch.equal(sym[1], -0.25 * rel.abs())
    # fp64 slopes and any float slopes dtype are accepted; a non-contiguous slopes view too.
    s64 = torch.tensor([0.5, 9.0, 0.25], dtype=torch.float64, device=DEVICE)[::2]
    assert torch.equal(alibi_bias(s64, 2, 4, q_offset=1).cpu(), out)


def test_alibi_causal_equals_bloom_through_softmax(backend):
    """BLOOM adds ``slope * j`` to every row; ours differs by a per-row constant: same attention."""
    H, L = 12, 21
    slopes = alibi_slopes(H, device=DEVICE)
    scores = torch.randn(H, L, L, device=DEVICE)
    causal = torch.ones(L, L, dtype=torch.bool, device=DEVICE).tril()
    ours = torch.softmax((scores + alibi_bias(slopes, L, L)).masked_fill(~causal, float("-inf")), -1)
    bloom = torch.softmax((scores + ref.bloom_alibi_row_bias(slopes, L)).masked_fill(~causal, float("-inf")), -1)
    assert max_err(ours, bloom) < 1e-6


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_writes_every_element(causal):
    runs = [alibi_torch] + ([alibi_triton] if TRITON_RUNS else [])
    slopes = alibi_slopes(5, device=DEVICE)
    for fn in runs:
        for Lq, Lk, off in [(3, 200, 7), (37, 19, 0), (1, 1, 0)]:
            out = torch.full((5, Lq, Lk), float("nan"), device=DEVICE, dtype=torch.bfloat16)
            fn(out, slopes, Lq, Lk, causal, off)
            truth = ref.alibi_bias_reference(slopes.cpu(), Lq, Lk, causal=causal, q_offset=off)
            assert not torch.isnan(out).any(), fn.__name__
            assert ulp_err(out.cpu(), truth, torch.bfloat16) <= 0.5, fn.__name__


def test_alibi_empty(backend):
    s = alibi_slopes(4, device=DEVICE)
    assert alibi_bias(s, 0, 5).shape == (4, 0, 5)
    assert alibi_bias(s, 3, 0).shape == (4, 3, 0)
    assert alibi_bias(torch.empty(0, device=DEVICE), 3, 5).shape == (0, 3, 5)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_slope_gradient(backend, causal):
    slopes = alibi_slopes(6, device=DEVICE).requires_grad_()
    g = torch.randn(6, 7, 11, device=DEVICE)
    (gs,) = torch.autograd.grad(alibi_bias(slopes, 7, 11, causal=causal, q_offset=4), slopes, g)
    s64 = slopes.detach().double().requires_grad_()
    (ts,) = torch.autograd.grad(ref.alibi_bias_reference(s64, 7, 11, causal=causal, q_offset=4), s64, g.double())
    assert max_err(gs, ts) < 1e-4
    s = torch.rand(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = lambda s: alibi_bias(s, 4, 6, causal=causal, q_offset=2, dtype=torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))
