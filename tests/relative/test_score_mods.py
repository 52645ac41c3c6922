"""ALiBi and T5 score_mods for flex attention: equal to the dense bias, with block masks, gradients,
compiled.
"""

import warnings

import pytest
import torch

import posenc_kernels.reference as ref
from posenc_kernels.ops.relative import alibi_bias, alibi_score_mod, alibi_slopes, t5_relative_bias, t5_score_mod

from conftest import max_err


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
