"""Relative position biases: ALiBi slopes and bias, T5 buckets and bias (+ table gradient), FlexAttention
score_mods, ops, compile, errors."""

import warnings

import pytest
import torch

import posenc_kernels.reference as ref
from posenc_kernels.ops.relative.buckets import bucket_layout
from posenc_kernels.ops.relative.kernel import alibi_triton, t5_triton
from posenc_kernels.ops.relative.torch_impl import alibi_torch, t5_torch
from posenc_kernels.ops.relative import (
    T5RelativePositionBias,
    alibi_bias,
    alibi_score_mod,
    alibi_slopes,
    t5_bucket_thresholds,
    t5_relative_bias,
    t5_relative_bucket,
    t5_score_mod,
)

from conftest import DEVICE, DTYPES, INTERPRET, TRITON_RUNS, assert_dtype_tolerance, max_err, ulp_err

ALL_DTYPES = DTYPES + [torch.float64]

# (bidirectional, num_buckets, max_distance): T5 encoder / decoder defaults, then other shapes of the table.
BUCKET_SETTINGS = [
    (True, 32, 128),
    (False, 32, 128),
    (True, 64, 256),
    (False, 16, 64),
    (True, 8, 20),
    (False, 6, 5),
    (True, 320, 800),
]

# (Lq, Lk, q_offset): square, odd, decode (one query after a cache), fewer keys than queries, chunked prefill.
SHAPES = [(13, 13, 0), (7, 45, 0), (1, 33, 32), (40, 9, 0), (5, 150, 145), (3, 17, 1000)]


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


# ---------------------------------------------------------------------------------------------
# FlexAttention score_mods
# ---------------------------------------------------------------------------------------------

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _qkv(B=2, H=4, Lq=5, Lk=37, D=16, dtype=torch.float32):
    q = torch.randn(B, H, Lq, D, dtype=dtype)
    k, v = (torch.randn(B, H, Lk, D, dtype=dtype) for _ in range(2))
    return q, k, v


def _flex(q, k, v, score_mod, **kw):
    with warnings.catch_warnings():  # "called without torch.compile": the unfused path is what is tested here
        warnings.simplefilter("ignore", UserWarning)
        return flex.flex_attention(q, k, v, score_mod=score_mod, **kw)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("Lq,Lk,off", [(5, 37, 32), (12, 12, 0), (3, 9, 100)])
def test_alibi_score_mod_matches_dense_bias(causal, Lq, Lk, off):
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    slopes = alibi_slopes(4)
    out = _flex(q, k, v, alibi_score_mod(slopes, causal=causal, q_offset=off))
    bias = alibi_bias(slopes, Lq, Lk, causal=causal, q_offset=off)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    truth = ref.attention_reference(q, k, v, bias=ref.alibi_bias_reference(slopes, Lq, Lk, causal=causal, q_offset=off))
    assert max_err(out, truth) < 2e-6 and max_err(sdpa, truth) < 2e-6


def test_alibi_score_mod_with_causal_block_mask():
    Lq, Lk, off = 6, 40, 34
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    slopes = alibi_slopes(4)
    block_mask = flex.create_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, Lq, Lk, device="cpu")
    out = _flex(q, k, v, alibi_score_mod(slopes, q_offset=off), block_mask=block_mask)
    keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + off
    truth = ref.attention_reference(q, k, v, bias=ref.alibi_bias_reference(slopes, Lq, Lk, q_offset=off), mask=keep)
    assert max_err(out, truth) < 2e-6


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("Lq,Lk,off", [(5, 37, 32), (12, 150, 0)])
def test_t5_score_mod_matches_dense_bias_and_gradient(bidirectional, Lq, Lk, off):
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    table = torch.randn(32, 4, requires_grad=True)
    g = torch.randn(2, 4, Lq, 16)
    kw = dict(bidirectional=bidirectional, max_distance=64, q_offset=off)
    out = _flex(q, k, v, t5_score_mod(table, **kw))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=t5_relative_bias(table, Lq, Lk, **kw))
    truth = ref.attention_reference(q, k, v, bias=ref.t5_relative_bias_reference(table.detach(), Lq, Lk, **kw))
    assert max_err(out, truth) < 2e-6 and max_err(dense, truth) < 2e-6
    (g_flex,) = torch.autograd.grad(out, table, g)
    (g_dense,) = torch.autograd.grad(dense, table, g)
    assert max_err(g_flex, g_dense) < 1e-5


def test_score_mods_compiled():
    """Compiled flex_attention: inductor's fused CPU kernel (forward only: PyTorch 2.13 has no flex
    backward on CPU under inductor) with both score_mods, and aot_eager with the table gradient."""
    Lq, Lk, off = 5, 37, 32
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    table = torch.randn(32, 4)
    truth = ref.attention_reference(q, k, v, bias=ref.t5_relative_bias_reference(table, Lq, Lk, q_offset=off))
    out = torch.compile(flex.flex_attention)(q, k, v, score_mod=t5_score_mod(table, q_offset=off))
    assert max_err(out, truth) < 2e-6
    slopes = alibi_slopes(4)
    truth = ref.attention_reference(q, k, v, bias=ref.alibi_bias_reference(slopes, Lq, Lk, causal=False, q_offset=off))
    out = torch.compile(flex.flex_attention)(q, k, v, score_mod=alibi_score_mod(slopes, causal=False, q_offset=off))
    assert max_err(out, truth) < 2e-6
    tg = table.clone().requires_grad_()
    out = torch.compile(flex.flex_attention, backend="aot_eager")(q, k, v, score_mod=t5_score_mod(tg, q_offset=off))
    g = torch.randn_like(out)
    (g_flex,) = torch.autograd.grad(out, tg, g)
    bias = t5_relative_bias(tg, Lq, Lk, q_offset=off)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert max_err(g_flex, torch.autograd.grad(dense, tg, g)[0]) < 1e-5


# ---------------------------------------------------------------------------------------------
# Ops, compile
# ---------------------------------------------------------------------------------------------


def test_opcheck(backend):
    slopes = alibi_slopes(3, device=DEVICE)
    for s in (slopes, slopes.clone().requires_grad_()):
        for causal in (True, False):
            torch.library.opcheck(torch.ops.posenc.alibi_bias.default, (s, 5, 7, causal, 2, torch.float32))
    table = torch.randn(16, 3, device=DEVICE)
    for t in (table, table.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.posenc.t5_relative_bias.default, (t, 5, 7, True, 20, 2))
    g = torch.randn(3, 5, 7, device=DEVICE)
    torch.library.opcheck(torch.ops.posenc.t5_relative_bias_backward.default, (g, 16, 5, 7, False, 20, 2))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    slopes = alibi_slopes(4, device=DEVICE)
    table = torch.randn(32, 4, device=DEVICE, requires_grad=True)
    scores = torch.randn(4, 9, 21, device=DEVICE)

    def attn_logits(scores, slopes, table):
        Lq, Lk = scores.shape[-2:]
        return scores + alibi_bias(slopes, Lq, Lk, q_offset=12) + t5_relative_bias(table, Lq, Lk, q_offset=12)

    compiled = torch.compile(attn_logits, fullgraph=True, backend=compile_backend)
    out = compiled(scores, slopes, table)
    expect = attn_logits(scores, slopes, table)
    assert torch.equal(out, expect) or max_err(out, expect) < 1e-6
    g = torch.randn_like(out)
    (gc,) = torch.autograd.grad(out, table, g)
    (ge,) = torch.autograd.grad(expect, table, g)
    assert max_err(gc, ge) < 1e-6


def test_torch_compile_dynamic_lengths(backend):
    table = torch.randn(32, 2, device=DEVICE)
    compiled = torch.compile(lambda x: t5_relative_bias(table, x.shape[0], x.shape[1]), fullgraph=True,
                             backend="aot_eager", dynamic=True)  # fmt: skip
    for Lq, Lk in [(3, 5), (4, 11), (7, 2)]:
        out = compiled(torch.empty(Lq, Lk, device=DEVICE))
        assert torch.equal(out.cpu(), ref.t5_relative_bias_hf_eager(table.cpu(), Lq, Lk))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


T, REL = torch.ones(32, 2), torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda: alibi_slopes(0), ValueError, "num_heads must be > 0"),
        (lambda: alibi_slopes(-3), ValueError, "num_heads must be > 0"),
        (lambda: alibi_slopes(4.0), TypeError, "num_heads must be an int"),
        (lambda: alibi_bias(torch.ones(2, 2), 3, 3), ValueError, "slopes must have 1 dimensions"),
        (lambda: alibi_bias(torch.ones(2, dtype=torch.int32), 3, 3), TypeError, "slopes must have dtype"),
        (lambda: alibi_bias([0.5], 3, 3), TypeError, "slopes must be a torch.Tensor"),
        (lambda: alibi_bias(torch.ones(2), -1, 3), ValueError, "Lq must be >= 0"),
        (lambda: alibi_bias(torch.ones(2), 3, -2), ValueError, "Lk must be >= 0"),
        (lambda: alibi_bias(torch.ones(2), 3, 3, q_offset=-1), ValueError, "q_offset must be >= 0"),
        (lambda: alibi_bias(torch.ones(2), 3.0, 3), TypeError, "Lq must be an int"),
        (lambda: alibi_bias(torch.ones(2), 3, 3, dtype=torch.int32), TypeError, "dtype must be a floating"),
        (lambda: alibi_bias(torch.ones(2), 3, 3, causal=1), TypeError, "causal must be a bool"),
        (lambda: alibi_score_mod(torch.ones(2, 1)), ValueError, "slopes must have 1 dimensions"),
        (lambda: alibi_score_mod(torch.ones(2), q_offset=-4), ValueError, "q_offset must be >= 0"),
        (lambda: t5_relative_bias(torch.ones(32), 3, 3), ValueError, "table must have 2 dimensions"),
        (lambda: t5_relative_bias(torch.ones(32, 2, dtype=torch.long), 3, 3), TypeError, "table must have dtype"),
        (lambda: t5_relative_bias(T, 3, 3, num_buckets=16), ValueError, r"num_buckets \(16\) must equal"),
        (lambda: t5_relative_bias(torch.ones(31, 2), 3, 3), ValueError, "num_buckets must be even"),
        (lambda: t5_relative_bias(T, 3, 3, max_distance=8), ValueError, "max_distance must be > max_exact = 8"),
        (lambda: t5_relative_bias(T, 3, 3, bidirectional=False, max_distance=16), ValueError, "max_exact = 16"),
        (lambda: t5_relative_bias(torch.ones(2, 2), 3, 3), ValueError, "num_buckets must be >= 4"),
        (lambda: t5_relative_bias(T, 3, 3, max_distance=100.0), TypeError, "max_distance must be an int"),
        (lambda: t5_relative_bias(T, -3, 3), ValueError, "Lq must be >= 0"),
        (lambda: t5_relative_bias(T, 3, 3, q_offset=-1), ValueError, "q_offset must be >= 0"),
        (lambda: t5_relative_bias(T, 3, 3, bidirectional=None), TypeError, "bidirectional must be a bool"),
        (lambda: t5_score_mod(torch.ones(31, 2)), ValueError, "num_buckets must be even"),
        (lambda: t5_relative_bucket(torch.zeros(3)), TypeError, "relative_position must be an integer tensor"),
        (lambda: t5_relative_bucket(REL.bool()), TypeError, "relative_position must be an integer"),
        (lambda: t5_relative_bucket(REL, num_buckets=33), ValueError, "num_buckets must be even"),
        (lambda: t5_relative_bucket(REL, max_distance=4), ValueError, "max_distance must be >"),
        (lambda: t5_relative_bucket(REL, bidirectional=False, num_buckets=1), ValueError, "num_buckets must be >= 2"),
        (lambda: T5RelativePositionBias(0), ValueError, "num_heads must be a positive int"),
    ],
)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


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
