"""QK-norm + RoPE test helpers: inputs, weights, and the value check against the float64 truth (the norm
reference then RoPE at the position oracle's rows) under the dtype-tied rule, HF eager being the
"same computation done by torch in the input dtype"."""

import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.ops.qknorm.reference import hf_rms_norm, rms_norm_reference

from conftest import DEVICE, assert_dtype_tolerance
from rope.common import oracle_rows


def weights(Hq, Hk, D, norm, dtype, *, device=DEVICE, present=(True, True)):
    n = (lambda H: D) if norm == "head" else (lambda H: H * D)
    qw = torch.randn(n(Hq), dtype=dtype, device=device) if present[0] else None
    kw = torch.randn(n(Hk), dtype=dtype, device=device) if present[1] and Hk else None
    return qw, kw


def nan_like(x):
    return None if x is None else torch.full_like(x, float("nan"))


def truth_and_eager(q, k, qw, kw, cos, sin, *, norm="head", eps=1e-6, weight_offset=0.0, positions=None,
                    offsets=0, interleaved=False):  # fmt: skip
    """float64 truth and HF-eager-in-dtype results at the oracle's rows."""
    rows = oracle_rows(q, positions, offsets)
    nk = dict(eps=eps, norm=norm, weight_offset=weight_offset)

    def eager_norm(x, w):
        if norm == "head":
            return hf_rms_norm(x, w, eps, weight_offset)
        return hf_rms_norm(x.flatten(-2), w, eps, weight_offset).view(x.shape)

    out = []
    for x, w in ((q, qw), (k, kw)):
        if x is None:
            out.append((None, None))
            continue
        truth = ref.rotate_reference(rms_norm_reference(x, w, **nk), cos, sin, rows, interleaved=interleaved)
        eager = ref.rotate_reference(eager_norm(x, w), cos.to(x.dtype), sin.to(x.dtype), rows, dtype=x.dtype,
                                     interleaved=interleaved)  # fmt: skip
        out.append((truth, eager))
    return out


def check_qk_norm_rope(q, k, qw, k_w, cos, sin, *, inplace, what="", **kw):
    """Run qk_norm_rope(_) and compare with the float64 truth (NaN-poisoned outputs: test_qknorm_values.py's
    launcher tests)."""
    (tq, eq), (tk, ek) = truth_and_eager(q, k, qw, k_w, cos, sin, **kw)
    q0, k0 = q.clone(), (k.clone() if k is not None else None)
    if inplace:
        out_q, out_k = pk.qk_norm_rope_(q, k, qw, k_w, cos, sin, **kw)
        assert out_q is q and out_k is k
    else:
        out_q, out_k = pk.qk_norm_rope(q, k, qw, k_w, cos, sin, **kw)
        assert torch.equal(q, q0) and (k is None or torch.equal(k, k0)), "out-of-place op modified its inputs"
    assert_dtype_tolerance(out_q, tq, eq, what=f"{what} q")
    if k is not None:
        assert_dtype_tolerance(out_k, tk, ek, what=f"{what} k")
    else:
        assert out_k is None
