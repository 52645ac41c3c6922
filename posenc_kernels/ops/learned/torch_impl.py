"""Learned position embeddings in pure torch (any device): the CPU path without the native extension, and
the ``torch`` backend. Same results as the kernels; temporaries bounded by a chunk size."""

from __future__ import annotations

import torch

from ..checks import acc_dtype, value_checks_on
from ..positions import token_positions

_CHUNK_ELEMS = 1 << 21  # bounds the temporaries (8 MiB of fp32 each)


def pe_add_torch(x, out, table, positions) -> None:
    """out = x + table[positions] for ``[B, S, D]`` x/out (any strides; out may be x), chunked along S. One
    ``torch.add`` with ``out=`` computes in fp32 (fp64) and rounds once, as the kernel does. With value
    checks skipped, rows outside the table become NaN (as in the kernel) instead of raising."""
    B, S, D = x.shape
    if B * S * D == 0:
        return
    rows = token_positions(positions, None, 0, B, S, x.device)
    checked = value_checks_on(x.device)
    P = table.shape[0]
    shared = rows.stride(0) == 0  # same rows for every sequence: gather once per chunk
    chunk = max(1, _CHUNK_ELEMS // max(1, (1 if shared else B) * D))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[:1, s0:s1] if shared else rows[:, s0:s1]
        if checked:
            emb = table[r]
        elif P == 0:
            emb = table.new_full((*r.shape, D), float("nan"))
        else:
            ok = (r >= 0) & (r < P)
            emb = table[r.clamp(0, P - 1)].masked_fill(~ok[..., None], float("nan"))
        torch.add(x[:, s0:s1], emb, out=out[:, s0:s1])


def grad_table_torch(g, positions, out, padding_idx: int, deterministic: bool) -> None:
    """Table gradient into ``out`` ``[P, D]``: index_add of the gradient rows in fp32 (fp64 for fp64
    tables), chunked along S when the rows need converting; rows outside the table get nothing (no host
    sync). Deterministic on CPU; on CUDA ``deterministic`` uses index_put_(accumulate=True), which sorts."""
    B, S, D = g.shape
    num_rows = out.shape[0]
    if num_rows * D == 0:
        return
    acc = acc_dtype(out.dtype)
    buf = out if out.dtype == acc else torch.empty(num_rows, D, dtype=acc, device=g.device)
    buf.zero_()
    rows = token_positions(positions, None, 0, B, S, g.device)
    chunk = S if g.dtype == acc else max(1, _CHUNK_ELEMS // max(1, B * D))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[:, s0:s1].reshape(-1)
        gg = g[:, s0:s1].reshape(-1, D).to(acc)
        keep = (r >= 0) & (r < num_rows)
        r, gg = r.clamp(0, num_rows - 1), torch.where(keep[:, None], gg, 0)
        if deterministic and g.device.type != "cpu":
            buf.index_put_((r,), gg, accumulate=True)
        else:
            buf.index_add_(0, r, gg)
    if padding_idx >= 0:
        buf[padding_idx] = 0
    if buf is not out:
        out.copy_(buf)
