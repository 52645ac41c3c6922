"""Helpers of the RoPE position-mode tests: q/k, the same-result check per backend, rotation by
explicit table rows.
"""

import torch

from posenc_kernels import reference as ref

from conftest import DEVICE, max_err


def qk(B, S, Hq, Hk, D, dtype=torch.float32):
    return torch.randn(B, S, Hq, D, device=DEVICE, dtype=dtype), torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype)


def same(a, b, backend):
    """Bit-equal; the native CPU kernels use the C library's cosf/sinf (the table and axis-map paths use
    torch's or numpy's, and axis maps run on the torch path) and round ``a*c - b*s`` without FMA, so there
    two paths agree to the operands' last ulp instead."""
    if backend == "native":  # a last-ulp difference of the operands, measured at the largest magnitude
        limit = 2 * torch.finfo(a.dtype).eps * b.abs().max().item()
        assert max_err(a, b) <= limit, (max_err(a, b), limit)
    else:
        assert torch.equal(a, b)


def rotate_with_rows(x, cos, sin, rows, *, interleaved=False, dtype=torch.float64):
    """float64 truth for x [B, S, H, D] with an explicit [B, S] table row per token."""
    return ref.rotate_reference(x, cos, sin, rows, interleaved=interleaved, dtype=dtype)
