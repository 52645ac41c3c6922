"""Relative position biases in pure torch (any device): the CPU path and the ``torch`` backend."""

from __future__ import annotations

import torch

from ..checks import acc_dtype
from .buckets import bucket_layout, bucket_torch, thresholds_tensor


def rel_offsets(Lq: int, Lk: int, q_offset: int, device) -> torch.Tensor:
    """``[Lq, Lk]`` int64 ``j - (q_offset + i)``."""
    q = torch.arange(Lq, device=device, dtype=torch.int64)[:, None] + q_offset
    return torch.arange(Lk, device=device, dtype=torch.int64)[None, :] - q


def alibi_torch(out, slopes, Lq, Lk, causal, q_offset) -> None:
    """One broadcast multiply into ``out``: computed in fp32 (fp64 for fp64 outputs), one rounding on store."""
    acc = acc_dtype(out.dtype)
    rel = rel_offsets(Lq, Lk, q_offset, out.device).to(acc)
    dist = rel if causal else -rel.abs()
    torch.mul(slopes.to(acc)[:, None, None], dist, out=out)


def _offset_buckets(num_buckets, max_distance, bidirectional, Lq, Lk, q_offset, device):
    """Buckets of the offsets r = r_min .. r_min + Lq + Lk - 2 (every key - query offset present, r_min =
    -(q_offset + Lq - 1)): the whole bias is a function of these Lq + Lk - 1 values."""
    r_min = -(q_offset + Lq - 1)
    r = torch.arange(r_min, r_min + Lq + Lk - 1, device=device, dtype=torch.int64)
    half, m, thr = bucket_layout(num_buckets, max_distance, bidirectional)
    thr_t = thresholds_tensor(num_buckets, max_distance, bidirectional, device)
    return bucket_torch(r, half, m, thr, bidirectional, thr_t)


def t5_torch(table, Lq, Lk, q_offset, bidirectional, max_distance) -> torch.Tensor:
    """Value of every offset (``[H, Lq + Lk - 1]``, ordered by decreasing offset), then the Toeplitz
    expansion as a strided view: row i of head h is the contiguous window starting at i. One pass."""
    bucket = _offset_buckets(table.shape[0], max_distance, bidirectional, Lq, Lk, q_offset, table.device)
    vals = table.t().contiguous().index_select(1, bucket.flip(0))  # [H, m]: value of offset Lk - 1 - q_offset - m
    # out[h, i, j] = value of offset j - q_offset - i = vals[h, i + Lk - 1 - j]: windows, reversed along j
    return vals.unfold(1, Lk, 1).flip(2).contiguous()  # flip already returns a dense tensor: no copy


def t5_backward_torch(grad, num_buckets, Lq, Lk, q_offset, bidirectional, max_distance) -> torch.Tensor:
    """Diagonal sums accumulated row by row (row i adds its Lk keys to the window of offsets it covers, in
    a fixed order: deterministic, no [Lq, Lk]-sized temporary), then one-hot bucket sums."""
    H = grad.shape[0]
    acc = acc_dtype(grad.dtype)
    diag = grad.new_zeros((H, Lq + Lk - 1), dtype=acc)  # diag[h, m]: offset m - (Lq - 1) - q_offset
    for i in range(Lq):
        diag[:, Lq - 1 - i : Lq - 1 - i + Lk] += grad[:, i, :]
    bucket = _offset_buckets(num_buckets, max_distance, bidirectional, Lq, Lk, q_offset, grad.device)
    onehot = (bucket[:, None] == torch.arange(num_buckets, device=grad.device)[None, :]).to(acc)  # [n_rel, nb]
    return (diag[:, :, None] * onehot[None]).sum(1).t().to(grad.dtype).contiguous()  # [nb, H]

