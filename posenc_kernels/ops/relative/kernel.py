"""Relative position biases: Triton kernels and their launchers.

Forward kernels (ALiBi, T5) write a ``[H, Lq, Lk]`` bias tile by tile (keys fastest), computing the
distances (buckets) of a tile once for a group of heads. The T5 backward is two kernels: diagonal sums
of the upstream gradient (one per relative offset), then per-bucket sums. No atomics anywhere.
"""

from __future__ import annotations

import torch

from ..checks import cdiv, device_guard, next_pow2
from ..registry import HAS_TRITON
from .buckets import bucket_layout, thresholds_tensor

if HAS_TRITON:
    import triton
    import triton.language as tl


    @triton.jit
    def t5_bucket_tl(
        rel,
        thr_ptr,
        HALF: tl.constexpr,
        MAX_EXACT: tl.constexpr,
        NUM_T: tl.constexpr,
        BIDIRECTIONAL: tl.constexpr,
    ):
        """T5 bucket of int tensor ``rel`` (key_pos - query_pos) inside a Triton kernel; ``thr_ptr`` holds
        the ``NUM_T`` thresholds of :func:`t5_bucket_thresholds` (``HALF`` buckets per direction)."""
        if BIDIRECTIONAL:
            base = tl.where(rel > 0, HALF, 0).to(rel.dtype)
            n = tl.abs(rel)
        else:
            base = tl.zeros_like(rel)
            n = tl.maximum(-rel, 0)
        count = tl.zeros_like(rel)
        for k in tl.static_range(NUM_T):
            count += (n >= tl.load(thr_ptr + k)).to(rel.dtype)
        return base + tl.where(n < MAX_EXACT, n, MAX_EXACT + count)

    @triton.jit
    def _relative_tile(pid, n_k_tiles, Lq, Lk, q_offset, stride_o_q, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile ``pid`` of the [Lq, Lk] plane (keys fastest): key - query offsets, mask, output offsets."""
        pid_q = pid // n_k_tiles
        pid_k = pid - pid_q * n_k_tiles
        i = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
        j = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        rel = j[None, :] - (i[:, None] + q_offset)
        mask = (i < Lq)[:, None] & (j < Lk)[None, :]
        offs = i[:, None] * stride_o_q + j[None, :]
        return rel, mask, offs

    @triton.jit
    def _alibi_kernel(
        out_ptr,
        slopes_ptr,
        Lq,
        Lk,
        q_offset,
        n_heads,
        heads_per_program,
        n_k_tiles,
        stride_o_h,
        stride_o_q,
        stride_s,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_G: tl.constexpr,
        CAUSAL: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (Lq x Lk tiles, head groups). The distances of a tile are computed once and reused for each
        head of the group: one multiply, one cast and one store per output element. The group's slopes
        are loaded at once (``BLOCK_G`` covers ``heads_per_program``) and picked per head in registers,
        so no store waits on a load issued after another's: one load round trip per program."""
        rel, mask, offs = _relative_tile(tl.program_id(0), n_k_tiles, Lq, Lk, q_offset, stride_o_q, BLOCK_Q, BLOCK_K)
        if CAUSAL:
            dist = rel.to(ACC)
        else:
            dist = -(tl.abs(rel).to(ACC))
        h0 = tl.program_id(1).to(tl.int64) * heads_per_program
        g = tl.arange(0, BLOCK_G)
        slopes = tl.load(slopes_ptr + (h0 + g) * stride_s, mask=g < heads_per_program, other=0.0).to(ACC)
        # heads_per_program divides n_heads (see _bias_blocks): every group is full, no head mask.
        k = 0
        while k < heads_per_program:  # while: Triton 3.6's interpreter cannot range() over int args
            slope = tl.sum(tl.where(g == k, slopes, 0.0), axis=0)
            val = (slope * dist).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + (h0 + k) * stride_o_h + offs, val, mask=mask)
            k += 1

    @triton.jit
    def _t5_bias_kernel(
        out_ptr,
        table_ptr,
        thr_ptr,
        Lq,
        Lk,
        q_offset,
        n_heads,
        heads_per_program,
        n_k_tiles,
        stride_o_h,
        stride_o_q,
        stride_t_b,
        stride_t_h,
        HALF: tl.constexpr,
        MAX_EXACT: tl.constexpr,
        NUM_T: tl.constexpr,
        BIDIRECTIONAL: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Grid: (Lq x Lk tiles, head groups). Buckets of a tile computed once; each head gathers its
        values from the (cache-resident) table. A pure lookup: the output is the table value exactly."""
        rel, mask, offs = _relative_tile(tl.program_id(0), n_k_tiles, Lq, Lk, q_offset, stride_o_q, BLOCK_Q, BLOCK_K)
        row = t5_bucket_tl(rel, thr_ptr, HALF, MAX_EXACT, NUM_T, BIDIRECTIONAL) * stride_t_b
        h0 = tl.program_id(1).to(tl.int64) * heads_per_program
        h = h0
        while h < h0 + heads_per_program:  # a divisor of n_heads: every group full (see _alibi_kernel)
            val = tl.load(table_ptr + row + h * stride_t_h, mask=mask, other=0.0)
            tl.store(out_ptr + h * stride_o_h + offs, val.to(out_ptr.dtype.element_ty), mask=mask)
            h += 1

    @triton.jit
    def _diagonal_sum_kernel(
        grad_ptr,
        diag_ptr,
        Lq,
        Lk,
        q_offset,
        r_min,
        n_rel,
        stride_g_h,
        stride_g_q,
        stride_g_k,
        stride_d_h,
        BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (blocks of relative offsets, heads). ``diag[h, r - r_min] = sum_i grad[h, i, i + q_offset + r]``
        for BLOCK_R consecutive offsets r: rows are walked in a fixed order, each row's BLOCK_R keys are
        contiguous in memory, and the sum is formed in registers - deterministic, no atomics."""
        pid_r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        idx = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        r = r_min + idx
        r_lo = r_min + pid_r * BLOCK_R
        r_hi = tl.minimum(r_lo + BLOCK_R, r_min + n_rel) - 1
        # Rows i whose key i + q_offset + r lies in [0, Lk) for some r of the block.
        i_lo = tl.maximum(-(q_offset + r_hi), 0)
        i_hi = tl.minimum(Lk - q_offset - r_lo, Lq)
        base = grad_ptr + h * stride_g_h
        acc = tl.zeros([BLOCK_I, BLOCK_R], dtype=ACC)
        i0 = i_lo  # while, not range(): Triton 3.6's interpreter cannot range() over in-kernel values
        while i0 < i_hi:
            i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
            j = i[:, None] + q_offset + r[None, :]
            m = (i < i_hi)[:, None] & (j >= 0) & (j < Lk) & (idx < n_rel)[None, :]
            acc += tl.load(base + i[:, None] * stride_g_q + j * stride_g_k, mask=m, other=0.0).to(ACC)
            i0 += BLOCK_I
        tl.store(diag_ptr + h * stride_d_h + idx, tl.sum(acc, axis=0), mask=idx < n_rel)

    @triton.jit
    def _t5_bucket_grad_kernel(
        diag_ptr,
        gtable_ptr,
        thr_ptr,
        r_min,
        n_rel,
        stride_d_h,
        stride_gt_b,
        stride_gt_h,
        NUM_BUCKETS: tl.constexpr,
        NB_P2: tl.constexpr,
        HALF: tl.constexpr,
        MAX_EXACT: tl.constexpr,
        NUM_T: tl.constexpr,
        BIDIRECTIONAL: tl.constexpr,
        BLOCK_R: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (heads,). ``gtable[b, h] = sum over offsets r with bucket(r) == b of diag[h, r]``: each
        program walks all offsets of its head in order, accumulating a [buckets, BLOCK_R] one-hot tile."""
        h = tl.program_id(0).to(tl.int64)
        b = tl.arange(0, NB_P2)
        acc = tl.zeros([NB_P2, BLOCK_R], dtype=ACC)
        r0 = 0
        while r0 < n_rel:  # while: Triton 3.6's interpreter cannot range() over int args
            idx = r0 + tl.arange(0, BLOCK_R)
            d = tl.load(diag_ptr + h * stride_d_h + idx, mask=idx < n_rel, other=0.0)
            bucket = t5_bucket_tl(r_min + idx.to(tl.int64), thr_ptr, HALF, MAX_EXACT, NUM_T, BIDIRECTIONAL)
            acc += tl.where(bucket[None, :] == b[:, None], d[None, :], 0.0)
            r0 += BLOCK_R
        out = tl.sum(acc, axis=1).to(gtable_ptr.dtype.element_ty)
        tl.store(gtable_ptr + b * stride_gt_b + h * stride_gt_h, out, mask=b < NUM_BUCKETS)

_TILE_ELEMS = 2048  # outputs per head per program: 16 per thread over 4 warps
_TARGET_PROGRAMS = 1024  # enough programs to fill an H100/H200 several times over


def _bias_blocks(H: int, Lq: int, Lk: int):
    """Tile heuristic for the forward kernels: 2048 outputs per tile (16 per thread over 4 warps, so every
    thread stores whole 128-bit vectors), 16 query rows x 128 keys for a square plane, wider in keys when
    there are few queries (decode: 1 x 2048), taller when there are few keys. A program covers a group of
    heads so that the distance/bucket math of a tile is done once for the group; groups are as large as
    leaves ~1024 programs (all heads in one program for a 32-head 4k x 4k bias)."""
    block_k = max(16, min(next_pow2(Lk), _TILE_ELEMS // min(next_pow2(Lq), 16)))
    block_q = max(1, min(next_pow2(Lq), _TILE_ELEMS // block_k))
    n_k = cdiv(Lk, block_k)
    tiles = cdiv(Lq, block_q) * n_k
    want = max(1, min(H, (tiles * H) // _TARGET_PROGRAMS))
    # A divisor of H, so every group is full and the kernels' head loops need no mask.
    heads_per_program = max(d for d in range(1, want + 1) if H % d == 0)
    return block_q, block_k, n_k, tiles, heads_per_program


def alibi_triton(out, slopes, Lq, Lk, causal, q_offset) -> None:
    H = out.shape[0]
    block_q, block_k, n_k, tiles, hpp = _bias_blocks(H, Lq, Lk)
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    with device_guard(out):
        _alibi_kernel[(tiles, cdiv(H, hpp))](
            out, slopes, Lq, Lk, q_offset, H, hpp, n_k, out.stride(0), out.stride(1), slopes.stride(0),
            BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_G=next_pow2(hpp), CAUSAL=causal, ACC=acc, num_warps=4,
        )  # fmt: skip


def _kernel_thresholds(num_buckets, max_distance, bidirectional, device) -> torch.Tensor:
    thr = thresholds_tensor(num_buckets, max_distance, bidirectional, device)
    return thr if thr.numel() else torch.zeros(1, dtype=torch.int64, device=device)  # never read (NUM_T = 0)


def t5_triton(out, table, Lq, Lk, q_offset, bidirectional, max_distance) -> None:
    H = out.shape[0]
    nb = table.shape[0]
    half, m, thr = bucket_layout(nb, max_distance, bidirectional)
    thr_t = _kernel_thresholds(nb, max_distance, bidirectional, table.device)
    block_q, block_k, n_k, tiles, hpp = _bias_blocks(H, Lq, Lk)
    with device_guard(out):
        _t5_bias_kernel[(tiles, cdiv(H, hpp))](
            out, table, thr_t, Lq, Lk, q_offset, H, hpp, n_k, out.stride(0), out.stride(1),
            table.stride(0), table.stride(1),
            HALF=half, MAX_EXACT=m, NUM_T=len(thr), BIDIRECTIONAL=bidirectional,
            BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip


def t5_backward_triton(grad, gtable, Lq, Lk, q_offset, bidirectional, max_distance) -> None:
    H = grad.shape[0]
    nb = gtable.shape[0]
    acc_t = torch.float64 if grad.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_t == torch.float64 else tl.float32
    n_rel = Lq + Lk - 1
    r_min = -(q_offset + Lq - 1)
    diag = torch.empty(H, n_rel, dtype=acc_t, device=grad.device)
    half, m, thr = bucket_layout(nb, max_distance, bidirectional)
    thr_t = _kernel_thresholds(nb, max_distance, bidirectional, grad.device)
    block_r = 128
    nb_p2 = next_pow2(nb)
    with device_guard(grad):
        _diagonal_sum_kernel[(cdiv(n_rel, block_r), H)](
            grad, diag, Lq, Lk, q_offset, r_min, n_rel,
            grad.stride(0), grad.stride(1), grad.stride(2), diag.stride(0),
            BLOCK_R=block_r, BLOCK_I=16, ACC=acc, num_warps=4,
        )  # fmt: skip
        _t5_bucket_grad_kernel[(H,)](
            diag, gtable, thr_t, r_min, n_rel, diag.stride(0), gtable.stride(0), gtable.stride(1),
            NUM_BUCKETS=nb, NB_P2=nb_p2, HALF=half, MAX_EXACT=m, NUM_T=len(thr), BIDIRECTIONAL=bidirectional,
            BLOCK_R=max(16, min(256, 2048 // nb_p2)), ACC=acc, num_warps=4,
        )  # fmt: skip

