"""The relative-bias ops: opcheck, torch.compile (static and dynamic lengths), bad input.
"""

import pytest
import torch

import posenc_kernels.reference as ref
from posenc_kernels.ops.relative import (
    T5RelativePositionBias,
    alibi_bias,
    alibi_score_mod,
    alibi_slopes,
    t5_relative_bias,
    t5_relative_bucket,
    t5_score_mod,
)

from conftest import DEVICE, max_err


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
