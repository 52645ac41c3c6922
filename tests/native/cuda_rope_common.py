"""Helpers of the CUDA C++ RoPE tests: rows, the op's arguments, the native call, the eager twin.
"""

import torch

from posenc_kernels import reference as ref

from conftest import assert_dtype_tolerance
from .native_cuda_common import *  # noqa: F401,F403  (the shared helpers: native_cuda_common.__all__)


def _rows(B, S, positions, offsets, offset):
    if positions is not None:
        return positions.to(torch.int64).expand(B, S)
    s = torch.arange(S, device=DEV)
    if offsets is not None:
        return offsets.to(torch.int64)[:, None] + s
    return (s + offset).expand(B, S)


def _args(cos=None, sin=None, inv_freq=None, positions=None, offsets=None, offset=0, cu_seqlens=None, axis_map=None,
          af=1.0, interleaved=False, conjugate=False, exact=False):  # fmt: skip
    """The ops' arguments after q and k, in schema order."""
    return (cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, float(af), interleaved, conjugate,
            exact)  # fmt: skip


def _native_rope(q, k, cos=None, sin=None, *, inplace=False, **kw):
    """rope_ (in place: q, k themselves, each version counter bumped once) or rope (out of place, outputs
    NaN-poisoned at allocation)."""
    if inplace:
        v = q._version if not q.is_inference() else None
        rope_(q, k, *_args(cos, sin, **kw))
        if v is not None:
            assert q._version == v + 1
        return q, k
    with nan_poisoned_allocations():
        qo, ko = rope(q, k, *_args(cos, sin, **kw))
    return qo, (ko if k is not None else None)


def _eager(x, cos, sin, rows, interleaved, conjugate):
    """The same computation by torch in x's dtype (HF style), the baseline of the tolerance rule."""
    s = -sin if conjugate else sin
    out, _ = ref.rope_hf_eager(x, None, cos, s, positions=rows, interleaved=interleaved)
    return out


def _check_rope(out, x, cos, sin, rows, interleaved, conjugate, what):
    truth = ref.rotate_reference(x, cos, sin, rows, interleaved=interleaved, conjugate=conjugate)
    assert_dtype_tolerance(out, truth, _eager(x, cos, sin, rows, interleaved, conjugate), what=what)


def _qk(B, S, Hq, Hk, D, dtype, layout="bshd"):
    if layout == "bhsd":  # HF's [B, H, S, D], passed transposed without a copy
        q = torch.randn(B, Hq, S, D, device=DEV, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hk, S, D, device=DEV, dtype=dtype).transpose(1, 2)
    elif layout == "misaligned":  # storage offset of one element and odd head strides: the scalar path
        q = torch.randn(B, S, Hq, D + 1, device=DEV, dtype=dtype)[..., 1:]
        k = torch.randn(B, S, Hk, D + 1, device=DEV, dtype=dtype)[..., 1:]
    else:
        q = torch.randn(B, S, Hq, D, device=DEV, dtype=dtype)
        k = torch.randn(B, S, Hk, D, device=DEV, dtype=dtype)
    return q, k


def _axis_tables(cos, sin, positions, axis_map, B, S):
    p = positions.to(torch.int64)
    if p.dim() == 2:
        p = p[:, None, :].expand(-1, B, S)
    rows = p[axis_map.to(torch.int64)].permute(1, 2, 0)  # [B, S, R/2]
    i = torch.arange(cos.shape[1], device=DEV)
    return cos[rows, i].flatten(0, 1), sin[rows, i].flatten(0, 1)
