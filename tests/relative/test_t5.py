"""T5 relative buckets and bias: buckets equal to HF's, exact thresholds, the bias and its table
gradient, loading HF weights.
"""

import pytest
import torch

import posenc_kernels.reference as ref
from posenc_kernels.ops.relative.buckets import bucket_layout
from posenc_kernels.ops.relative.kernel import t5_triton
from posenc_kernels.ops.relative.torch_impl import t5_torch
from posenc_kernels.ops.relative import (
    T5RelativePositionBias,
    t5_bucket_thresholds,
    t5_relative_bias,
    t5_relative_bucket,
)

from conftest import DEVICE, INTERPRET, TRITON_RUNS, max_err
from .common import ALL_DTYPES, BUCKET_SETTINGS, SHAPES


# ---------------------------------------------------------------------------------------------
# T5 buckets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", BUCKET_SETTINGS, ids=str)
def test_bucket_equals_hf_on_every_offset(setting):
    bidirectional, nb, md = setting
    rel = torch.arange(-1000, 1001)
    hf = ref.t5_relative_bucket_hf(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
    ours = t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
    assert torch.equal(ours, hf)
    assert int(ours.min()) >= 0 and int(ours.max()) == nb - 1
    # Any int dtype and shape; the result keeps both.
    r32 = rel.to(torch.int32).reshape(3, 23, 29)[:, ::2]
    out32 = t5_relative_bucket(r32, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
    assert out32.dtype == torch.int32 and torch.equal(out32.long(), hf.reshape(3, 23, 29)[:, ::2])


@pytest.mark.parametrize("setting", BUCKET_SETTINGS, ids=str)
def test_bucket_thresholds_are_exact(setting):
    """Each threshold is the first distance whose exact log bucket reaches the next bucket (checked with
    Python's exact rationals), so the distances where the log is an integer (16/32/64 for T5's defaults)
    land in the upper bucket by construction."""
    from fractions import Fraction

    bidirectional, nb, md = setting
    half, m, thr = bucket_layout(nb, md, bidirectional)
    assert t5_bucket_thresholds(nb, md, bidirectional) == thr and len(thr) == half - m - 1
    R = half - m
    for k, t in enumerate(thr, start=1):
        # (t/m)^R >= (md/m)^k and ((t-1)/m)^R < (md/m)^k, in exact rationals
        assert Fraction(t, m) ** R >= Fraction(md, m) ** k
        assert t == m or Fraction(t - 1, m) ** R < Fraction(md, m) ** k
    if (bidirectional, nb, md) == (True, 32, 128):
        b = t5_relative_bucket(torch.tensor([-15, -16, -31, -32, -63, -64]))
        assert b.tolist() == [9, 10, 11, 12, 13, 14]


# ---------------------------------------------------------------------------------------------
# T5 bias
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", BUCKET_SETTINGS[:4], ids=str)
def test_t5_bias_kernel_covers_every_offset(backend, setting):
    """One query at position 1000, keys 0..2000: every offset in [-1000, 1000] through the kernel."""
    bidirectional, nb, md = setting
    table = torch.randn(nb, 2, device=DEVICE)
    out = t5_relative_bias(table, 1, 2001, bidirectional=bidirectional, max_distance=md, q_offset=1000)
    kw = dict(bidirectional=bidirectional, max_distance=md, q_offset=1000)
    assert torch.equal(out.cpu(), ref.t5_relative_bias_hf_eager(table.cpu(), 1, 2001, **kw))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_t5_bias(backend, shape, bidirectional, dtype):
    Lq, Lk, off = shape
    table = torch.randn(32, 6, device=DEVICE).to(dtype)
    out = t5_relative_bias(table, Lq, Lk, bidirectional=bidirectional, q_offset=off, max_distance=40)
    assert out.shape == (6, Lq, Lk) and out.dtype == dtype
    hf = ref.t5_relative_bias_hf_eager(table.cpu(), Lq, Lk, bidirectional=bidirectional, max_distance=40, q_offset=off)
    assert torch.equal(out.cpu(), hf)  # a lookup: exact in every dtype


def test_t5_bias_table_layouts(backend):
    # HF's [num_buckets, H] weight, a transposed [H, num_buckets] storage, a strided slice.
    base = torch.randn(6, 32, device=DEVICE)
    for table in (base.t(), base.t().contiguous(), torch.randn(32, 12, device=DEVICE)[:, ::2]):
        out = t5_relative_bias(table, 9, 14, q_offset=3, num_buckets=32)
        assert torch.equal(out.cpu(), ref.t5_relative_bias_hf_eager(table.cpu(), 9, 14, q_offset=3))


def test_t5_writes_every_element():
    table = torch.randn(32, 3, device=DEVICE)
    for Lq, Lk, off in [(3, 200, 7), (37, 19, 0), (1, 1, 0)]:
        truth = ref.t5_relative_bias_hf_eager(table.cpu(), Lq, Lk, q_offset=off)
        out = t5_torch(table, Lq, Lk, off, True, 128)  # the torch path returns a fresh dense tensor
        assert out.is_contiguous() and torch.equal(out.cpu(), truth)
        if TRITON_RUNS:
            out = torch.full((3, Lq, Lk), float("nan"), device=DEVICE)
            t5_triton(out, table, Lq, Lk, off, True, 128)
            assert torch.equal(out.cpu(), truth)


def test_t5_empty(backend):
    table = torch.randn(32, 4, device=DEVICE, requires_grad=True)
    for Lq, Lk in [(0, 5), (3, 0)]:
        out = t5_relative_bias(table, Lq, Lk)
        assert out.shape == (4, Lq, Lk)
        (g,) = torch.autograd.grad(out.sum(), table)
        assert torch.equal(g, torch.zeros_like(g))
    assert t5_relative_bias(torch.randn(32, 0, device=DEVICE), 3, 5).shape == (0, 3, 5)


def test_module_loads_hf_weights(backend):
    mod = T5RelativePositionBias(4, num_buckets=32, max_distance=128, bidirectional=False).to(DEVICE)
    w = torch.randn(32, 4, device=DEVICE)
    mod.load_state_dict({"relative_attention_bias.weight": w})
    out = mod(6, 10, q_offset=4)
    assert torch.equal(out.cpu(), ref.t5_relative_bias_hf_eager(w.cpu(), 6, 10, bidirectional=False, q_offset=4))
    assert "bidirectional=False" in repr(mod)


# ---------------------------------------------------------------------------------------------
# T5 table gradient
# ---------------------------------------------------------------------------------------------


def _table_grads(table, g, Lq, Lk, **kw):
    t = table.detach().requires_grad_()
    (ours,) = torch.autograd.grad(t5_relative_bias(t, Lq, Lk, **kw), t, g)
    t64 = table.detach().cpu().double().requires_grad_()
    (truth,) = torch.autograd.grad(ref.t5_relative_bias_reference(t64, Lq, Lk, **kw), t64, g.cpu().double())
    return ours.cpu(), truth


GRAD_SHAPES = [(13, 13, 0), (7, 45, 0), (1, 33, 32), (40, 9, 0), (19, 300, 281)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_t5_table_gradient_exact_on_integers(backend, shape, bidirectional, dtype):
    """Small-integer upstream gradients make every partial sum exact in fp32: the table gradient must then
    equal the float64 truth rounded once to the table's dtype, so a term dropped or sent to the wrong
    bucket (an edge diagonal, an off-by-one offset) cannot hide inside a tolerance."""
    Lq, Lk, off = shape
    table = torch.randn(32, 5, device=DEVICE, dtype=dtype)
    g = torch.randint(-8, 9, (5, Lq, Lk), device=DEVICE).to(dtype)
    ours, truth = _table_grads(table, g, Lq, Lk, bidirectional=bidirectional, max_distance=64, q_offset=off)
    assert ours.dtype == dtype and ours.shape == (32, 5)
    expect = truth.to(dtype)
    if INTERPRET and backend == "triton" and dtype == torch.bfloat16:
        # The Triton interpreter's fp32 -> bf16 cast truncates (GPUs round to nearest): accept either.
        toward_zero = (truth.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
        assert torch.all((ours == expect) | (ours == toward_zero))
    else:
        assert torch.equal(ours, expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_t5_table_gradient(backend, shape, bidirectional, dtype):
    """Random upstream gradient vs float64 reference autograd, within the a-priori error bound of an fp32
    sum: each table entry is a sum of diagonal sums (<= Lq terms each) over <= Lq + Lk - 1 offsets, so in
    any order its error is at most (Lq + Lq + Lk - 1) * 2**-24 * (sum of |terms|), plus half an ulp of the
    table's dtype for the final rounding (a whole ulp under the Triton interpreter, whose fp32 -> bf16 cast
    truncates; GPUs round to nearest). A bf16 accumulation or a dropped term exceeds it; a comparison with
    torch's own sum in another order would be a coin flip (a sum's error depends on its order)."""
    Lq, Lk, off = shape
    kw = dict(bidirectional=bidirectional, max_distance=64, q_offset=off)
    table = torch.randn(32, 5, device=DEVICE, dtype=dtype)
    g = torch.randn(5, Lq, Lk, device=DEVICE, dtype=dtype)
    ours, truth = _table_grads(table, g, Lq, Lk, **kw)
    _, abs_sum = _table_grads(table, g.abs(), Lq, Lk, **kw)
    depth = Lq + (Lq + Lk - 1)
    sum_err = depth * 2.0**-24 * abs_sum
    mag = (truth.abs() + sum_err).clamp_min(torch.finfo(dtype).tiny)
    rounding = 1.0 if (INTERPRET and backend == "triton" and dtype != torch.float32) else 0.5
    bound = sum_err + rounding * torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(mag)))
    err = (ours.double() - truth).abs()
    assert torch.all(err <= bound), f"dtable {shape}: worst error / bound {(err / bound).max().item():.3f}"


def test_t5_gradient_deterministic_and_strided_grad(backend):
    table = torch.randn(32, 4, device=DEVICE, requires_grad=True)
    g = torch.randn(4, 50, 70, device=DEVICE)
    runs = [torch.autograd.grad(t5_relative_bias(table, 50, 70, q_offset=9), table, g)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # out.sum() sends an expanded (stride 0) gradient; a [Lk, Lq]-stored transposed gradient too.
    (gs,) = torch.autograd.grad(t5_relative_bias(table, 50, 70).sum(), table)
    ones = torch.ones(4, 50, 70, device=DEVICE)
    assert max_err(gs, torch.autograd.grad(t5_relative_bias(table, 50, 70), table, ones)[0]) == 0
    gt = torch.randn(4, 70, 50, device=DEVICE).transpose(1, 2)
    (a,) = torch.autograd.grad(t5_relative_bias(table, 50, 70), table, gt)
    (b,) = torch.autograd.grad(t5_relative_bias(table, 50, 70), table, gt.contiguous())
    assert torch.equal(a, b)


def test_t5_gradcheck_float64(backend):
    table = torch.randn(8, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for kw in (dict(bidirectional=True, max_distance=10), dict(bidirectional=False, max_distance=6, q_offset=3)):
        # fast mode (random projections of the Jacobian) keeps the interpreter's launch count small; the
        # integer test above pins every entry of the backward exactly.
        assert torch.autograd.gradcheck(lambda t: t5_relative_bias(t, 5, 9, **kw), (table,), fast_mode=True)


def test_bucket_narrow_integer_dtypes_do_not_overflow():
    from posenc_kernels import t5_relative_bucket

    wide = t5_relative_bucket(torch.tensor([-128, -1, 0, 5, 127]))
    assert torch.equal(t5_relative_bucket(torch.tensor([-128, -1, 0, 5, 127], dtype=torch.int8)).long(), wide)
    uni = t5_relative_bucket(torch.tensor([-32768, 7], dtype=torch.int16), bidirectional=False)
    assert uni.tolist() == [31, 0]
    with pytest.raises(ValueError, match="cannot hold buckets up to"):
        t5_relative_bucket(torch.tensor([5], dtype=torch.int8), num_buckets=320, max_distance=1000)


def test_bucket_keeps_the_exact_value_where_fp32_log_rounds_low():
    """num_buckets 34, max_distance 27, offset -18: log(18/8)/log(27/8) is exactly 2/3, so the bucket is
    8 + 6 = 14; HF's fp32 log lands on 13."""
    from posenc_kernels import t5_relative_bucket

    assert t5_relative_bucket(torch.tensor([-18]), num_buckets=34, max_distance=27).item() == 14
