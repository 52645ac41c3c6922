"""Relative position biases added to attention scores: ALiBi and T5's bucketed learned biases.

Read top-down: bucket thresholds -> Triton kernels -> pure-torch implementation -> validation and
launchers -> torch.library ops (fake + autograd) -> public functions (dense ``[H, Lq, Lk]`` biases and
FlexAttention ``score_mod`` factories) -> nn.Module.

Positions (the public contract): query ``i`` sits at position ``q_offset + i`` (decode: ``q_offset`` is the
number of cached tokens), key ``j`` at ``j``; the relative position is ``key_pos - query_pos`` (HF T5's
``memory_position - context_position``).

* ALiBi (Press et al. 2022): causal form ``slope_h * (j - (q_offset + i))``, zero on the diagonal and
  negative for past keys; future keys get a *positive* value and must be removed by the attention mask
  (as every causal model does). Symmetric form (encoders): ``-slope_h * |j - (q_offset + i)|``.
* T5 (Raffel et al. 2020): ``table[bucket(j - (q_offset + i)), h]`` with ``table`` the ``[num_buckets, H]``
  weight of HF's ``relative_attention_bias`` embedding and ``bucket`` HF's ``_relative_position_bucket``,
  reproduced with integer thresholds (no float log).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from ._common import FLOAT_DTYPES, HAS_TRITON, INT_DTYPES, check_tensor, device_guard, next_pow2, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "alibi_score_mod",
    "t5_bucket_thresholds",
    "t5_relative_bucket",
    "t5_relative_bias",
    "t5_score_mod",
    "T5RelativePositionBias",
]


# ==============================================================================================
# T5 buckets as integer thresholds (shared by the torch code, the Triton kernels and the score_mod)
# ==============================================================================================


def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _check_bucket_args(num_buckets, max_distance, bidirectional) -> None:
    if not _is_int(num_buckets):
        raise TypeError(f"num_buckets must be an int, got {type(num_buckets).__name__}")
    if not _is_int(max_distance):
        raise TypeError(f"max_distance must be an int, got {type(max_distance).__name__}")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    if bidirectional and num_buckets % 2:
        raise ValueError(
            f"num_buckets must be even when bidirectional=True (half for keys before the query, half after), "
            f"got {num_buckets}"
        )
    half = num_buckets // 2 if bidirectional else num_buckets
    if half < 2:
        need = 4 if bidirectional else 2
        raise ValueError(f"num_buckets must be >= {need} with bidirectional={bidirectional}, got {num_buckets}")
    max_exact = half // 2
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be > max_exact = {max_exact} (half of the {half} buckets per direction are exact "
            f"offsets; the log buckets span max_exact..max_distance), got {max_distance}"
        )


@functools.lru_cache(maxsize=128)
def _bucket_layout(num_buckets: int, max_distance: int, bidirectional: bool):
    """(buckets per direction, max_exact, thresholds): ``thresholds[k-1]`` is the smallest distance ``n``
    that reaches log bucket ``k`` (``1 <= k < half - max_exact``), found with exact integer arithmetic.

    HF's bucket of a distance ``n >= m = max_exact`` is ``m + floor(log(n / m) / log(D / m) * R)`` (``R =
    half - m``, ``D = max_distance``, clamped to ``half - 1``). ``floor(...) >= k`` holds exactly when
    ``(n / m) ** R >= (D / m) ** k``, i.e. ``n ** R * m ** k >= D ** k * m ** R`` in integers. So the bucket
    is ``m + (number of thresholds <= n)``, with no float log that could land one bucket low at the distances
    where the log is an exact integer (16, 32 and 64 for T5's defaults)."""
    half = num_buckets // 2 if bidirectional else num_buckets
    m = half // 2
    R = half - m
    thresholds = []
    for k in range(1, R):
        rhs = max_distance**k * m**R
        n = max(m, math.ceil(m * (max_distance / m) ** (k / R)))  # float guess, then made exact
        while n > m and (n - 1) ** R * m**k >= rhs:
            n -= 1
        while n**R * m**k < rhs:
            n += 1
        thresholds.append(n)
    return half, m, tuple(thresholds)


def t5_bucket_thresholds(num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True) -> tuple:
    """The smallest distance reaching each logarithmic T5 bucket, as exact ints (see :func:`t5_relative_bucket`).

    A distance ``n >= max_exact`` falls in bucket ``max_exact + (number of thresholds <= n)`` (plus the
    direction offset when bidirectional). Triton kernels load the same values (``t5_bucket_tl``).

    >>> import posenc_kernels.relative as rel
    >>> rel.t5_bucket_thresholds(32, 128, True)                 # T5 defaults: 16 buckets per direction
    (12, 16, 23, 32, 46, 64, 91)
    """
    _check_bucket_args(num_buckets, max_distance, bidirectional)
    return _bucket_layout(int(num_buckets), int(max_distance), bool(bidirectional))[2]


@functools.lru_cache(maxsize=64)
def _thresholds_tensor(num_buckets: int, max_distance: int, bidirectional: bool, device: torch.device) -> torch.Tensor:
    """The thresholds as an int64 tensor on ``device`` (cached: a few bytes per setting and device)."""
    thr = _bucket_layout(num_buckets, max_distance, bidirectional)[2]
    return torch.tensor(thr, dtype=torch.int64, device=device)


def _bucket_torch(rel, half: int, max_exact: int, thresholds: Sequence[int], bidirectional: bool, thr_tensor=None):
    """Bucket of int tensor ``rel`` (key_pos - query_pos). With ``thr_tensor`` (the thresholds as a tensor)
    the thresholds passed are counted by one ``bucketize``; without, by elementwise comparisons, which run
    the same eagerly, under vmap (FlexAttention score_mods) and in compiled graphs."""
    if bidirectional:
        base = (rel > 0).to(rel.dtype) * half
        n = rel.abs()
    else:
        base = torch.zeros_like(rel)
        n = (-rel).clamp_min(0)
    if thr_tensor is not None:
        count = torch.bucketize(n, thr_tensor, out_int32=rel.dtype == torch.int32, right=True)
    else:
        count = torch.zeros_like(rel)
        for t in thresholds:
            count = count + (n >= t).to(rel.dtype)
    return base + torch.where(n < max_exact, n, max_exact + count)


# ==============================================================================================
# Triton kernels
# ==============================================================================================
if HAS_TRITON:

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
        CAUSAL: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (Lq x Lk tiles, head groups). The distances of a tile are computed once and reused for each
        head of the group: one multiply, one cast and one store per output element."""
        rel, mask, offs = _relative_tile(tl.program_id(0), n_k_tiles, Lq, Lk, q_offset, stride_o_q, BLOCK_Q, BLOCK_K)
        if CAUSAL:
            dist = rel.to(ACC)
        else:
            dist = -(tl.abs(rel).to(ACC))
        h0 = tl.program_id(1).to(tl.int64) * heads_per_program
        # heads_per_program divides n_heads (see _bias_blocks): every group is full, no head mask.
        h = h0
        while h < h0 + heads_per_program:  # while: Triton 3.6's interpreter cannot range() over int args
            slope = tl.load(slopes_ptr + h * stride_s).to(ACC)
            val = (slope * dist).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + h * stride_o_h + offs, val, mask=mask)
            h += 1

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
        # A while loop: its data-dependent bounds work in every Triton interpreter (a range() over
        # in-kernel values does not in 3.6's).
        i0 = i_lo
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


# ==============================================================================================
# Pure-torch implementation
# ==============================================================================================


def _acc_dtype(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _rel_offsets(Lq: int, Lk: int, q_offset: int, device) -> torch.Tensor:
    """``[Lq, Lk]`` int64 ``j - (q_offset + i)``."""
    q = torch.arange(Lq, device=device, dtype=torch.int64)[:, None] + q_offset
    return torch.arange(Lk, device=device, dtype=torch.int64)[None, :] - q


def _alibi_torch(out, slopes, Lq, Lk, causal, q_offset) -> None:
    """One broadcast multiply into ``out``: computed in fp32 (fp64 for fp64 outputs), one rounding on store."""
    acc = _acc_dtype(out.dtype)
    rel = _rel_offsets(Lq, Lk, q_offset, out.device).to(acc)
    dist = rel if causal else -rel.abs()
    torch.mul(slopes.to(acc)[:, None, None], dist, out=out)


def _offset_buckets(num_buckets, max_distance, bidirectional, Lq, Lk, q_offset, device):
    """Buckets of the offsets r = r_min .. r_min + Lq + Lk - 2 (every key - query offset present, r_min =
    -(q_offset + Lq - 1)): the whole bias is a function of these Lq + Lk - 1 values."""
    r_min = -(q_offset + Lq - 1)
    r = torch.arange(r_min, r_min + Lq + Lk - 1, device=device, dtype=torch.int64)
    half, m, thr = _bucket_layout(num_buckets, max_distance, bidirectional)
    thr_t = _thresholds_tensor(num_buckets, max_distance, bidirectional, device)
    return _bucket_torch(r, half, m, thr, bidirectional, thr_t)


def _t5_torch(table, Lq, Lk, q_offset, bidirectional, max_distance) -> torch.Tensor:
    """Value of every offset (``[H, Lq + Lk - 1]``, ordered by decreasing offset), then the Toeplitz
    expansion as a strided view: row i of head h is the contiguous window starting at i. One pass."""
    bucket = _offset_buckets(table.shape[0], max_distance, bidirectional, Lq, Lk, q_offset, table.device)
    vals = table.t().contiguous().index_select(1, bucket.flip(0))  # [H, m]: value of offset Lk - 1 - q_offset - m
    # out[h, i, j] = value of offset j - q_offset - i = vals[h, i + Lk - 1 - j]: windows, reversed along j
    return vals.unfold(1, Lk, 1).flip(2).contiguous()  # flip already returns a dense tensor: no copy


def _t5_backward_torch(grad, num_buckets, Lq, Lk, q_offset, bidirectional, max_distance) -> torch.Tensor:
    """Diagonal sums accumulated row by row (row i adds its Lk keys to the window of offsets it covers, in
    a fixed order: deterministic, no [Lq, Lk]-sized temporary), then one-hot bucket sums."""
    H = grad.shape[0]
    acc = _acc_dtype(grad.dtype)
    diag = grad.new_zeros((H, Lq + Lk - 1), dtype=acc)  # diag[h, m]: offset m - (Lq - 1) - q_offset
    for i in range(Lq):
        diag[:, Lq - 1 - i : Lq - 1 - i + Lk] += grad[:, i, :]
    bucket = _offset_buckets(num_buckets, max_distance, bidirectional, Lq, Lk, q_offset, grad.device)
    onehot = (bucket[:, None] == torch.arange(num_buckets, device=grad.device)[None, :]).to(acc)  # [n_rel, nb]
    return (diag[:, :, None] * onehot[None]).sum(1).t().to(grad.dtype).contiguous()  # [nb, H]


# ==============================================================================================
# Validation and launchers
# ==============================================================================================


def _check_lengths(Lq, Lk, q_offset) -> None:
    for name, v in (("Lq", Lq), ("Lk", Lk), ("q_offset", q_offset)):
        if not _is_int(v):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def _check_alibi(slopes, Lq, Lk, q_offset, dtype) -> None:
    check_tensor("slopes", slopes, dtypes=FLOAT_DTYPES, ndim=1)
    _check_lengths(Lq, Lk, q_offset)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")


def _check_t5(table, Lq, Lk, q_offset, bidirectional, max_distance, num_buckets=None) -> None:
    check_tensor("table", table, dtypes=FLOAT_DTYPES, ndim=2)
    if num_buckets is not None and num_buckets != table.shape[0]:
        raise ValueError(
            f"num_buckets ({num_buckets}) must equal table.shape[0] (table is [num_buckets, H], got "
            f"{tuple(table.shape)})"
        )
    _check_bucket_args(table.shape[0], max_distance, bidirectional)
    _check_lengths(Lq, Lk, q_offset)


_TILE_ELEMS = 2048  # outputs per head per program: 16 per thread over 4 warps
_TARGET_PROGRAMS = 1024  # enough programs to fill an H100/H200 several times over


def _bias_blocks(H: int, Lq: int, Lk: int):
    """Tile heuristic for the forward kernels: 2048 outputs per tile (16 per thread over 4 warps, so every
    thread stores whole 128-bit vectors), 16 query rows x 128 keys for a square plane, wider in keys when
    there are few queries (decode: 1 x 2048), taller when there are few keys. A program covers a group of
    heads so that the distance/bucket math of a tile is done once for the group; groups are as large as
    leaves ~1024 programs (all heads in one program for a 32-head 4k x 4k bias). Chosen by compiling for
    sm_90: no spills, 128-bit stores, <= 100 registers."""
    block_k = max(16, min(next_pow2(Lk), _TILE_ELEMS // min(next_pow2(Lq), 16)))
    block_q = max(1, min(next_pow2(Lq), _TILE_ELEMS // block_k))
    n_k = triton.cdiv(Lk, block_k)
    tiles = triton.cdiv(Lq, block_q) * n_k
    want = max(1, min(H, (tiles * H) // _TARGET_PROGRAMS))
    # A divisor of H, so every group is full and the kernels' head loops need no mask.
    heads_per_program = max(d for d in range(1, want + 1) if H % d == 0)
    return block_q, block_k, n_k, tiles, heads_per_program


def _alibi_triton(out, slopes, Lq, Lk, causal, q_offset) -> None:
    H = out.shape[0]
    block_q, block_k, n_k, tiles, hpp = _bias_blocks(H, Lq, Lk)
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    with device_guard(out):
        _alibi_kernel[(tiles, triton.cdiv(H, hpp))](
            out, slopes, Lq, Lk, q_offset, H, hpp, n_k, out.stride(0), out.stride(1), slopes.stride(0),
            BLOCK_Q=block_q, BLOCK_K=block_k, CAUSAL=causal, ACC=acc, num_warps=4,
        )  # fmt: skip


def _kernel_thresholds(num_buckets, max_distance, bidirectional, device) -> torch.Tensor:
    thr = _thresholds_tensor(num_buckets, max_distance, bidirectional, device)
    return thr if thr.numel() else torch.zeros(1, dtype=torch.int64, device=device)  # never read (NUM_T = 0)


def _t5_triton(out, table, Lq, Lk, q_offset, bidirectional, max_distance) -> None:
    H = out.shape[0]
    nb = table.shape[0]
    half, m, thr = _bucket_layout(nb, max_distance, bidirectional)
    thr_t = _kernel_thresholds(nb, max_distance, bidirectional, table.device)
    block_q, block_k, n_k, tiles, hpp = _bias_blocks(H, Lq, Lk)
    with device_guard(out):
        _t5_bias_kernel[(tiles, triton.cdiv(H, hpp))](
            out, table, thr_t, Lq, Lk, q_offset, H, hpp, n_k, out.stride(0), out.stride(1),
            table.stride(0), table.stride(1),
            HALF=half, MAX_EXACT=m, NUM_T=len(thr), BIDIRECTIONAL=bidirectional,
            BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip


def _t5_backward_triton(grad, gtable, Lq, Lk, q_offset, bidirectional, max_distance) -> None:
    H = grad.shape[0]
    nb = gtable.shape[0]
    acc_t = torch.float64 if grad.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_t == torch.float64 else tl.float32
    n_rel = Lq + Lk - 1
    r_min = -(q_offset + Lq - 1)
    diag = torch.empty(H, n_rel, dtype=acc_t, device=grad.device)
    half, m, thr = _bucket_layout(nb, max_distance, bidirectional)
    thr_t = _kernel_thresholds(nb, max_distance, bidirectional, grad.device)
    block_r = 128
    nb_p2 = next_pow2(nb)
    with device_guard(grad):
        _diagonal_sum_kernel[(triton.cdiv(n_rel, block_r), H)](
            grad, diag, Lq, Lk, q_offset, r_min, n_rel,
            grad.stride(0), grad.stride(1), grad.stride(2), diag.stride(0),
            BLOCK_R=block_r, BLOCK_I=16, ACC=acc, num_warps=4,
        )  # fmt: skip
        _t5_bucket_grad_kernel[(H,)](
            diag, gtable, thr_t, r_min, n_rel, diag.stride(0), gtable.stride(0), gtable.stride(1),
            NUM_BUCKETS=nb, NB_P2=nb_p2, HALF=half, MAX_EXACT=m, NUM_T=len(thr), BIDIRECTIONAL=bidirectional,
            BLOCK_R=max(16, min(256, 2048 // nb_p2)), ACC=acc, num_warps=4,
        )  # fmt: skip


# ==============================================================================================
# torch.library ops
# ==============================================================================================


@torch.library.custom_op("posenc::alibi_bias", mutates_args=())
def _alibi_bias_op(
    slopes: torch.Tensor, Lq: int, Lk: int, causal: bool, q_offset: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[H, Lq, Lk]`` ALiBi bias in ``dtype`` (math in fp32, fp64 for fp64 outputs)."""
    _check_alibi(slopes, Lq, Lk, q_offset, dtype)
    out = torch.empty((slopes.shape[0], Lq, Lk), dtype=dtype, device=slopes.device)
    if out.numel() == 0:
        return out
    if resolve_backend(out.device) == "triton":
        _alibi_triton(out, slopes, Lq, Lk, causal, q_offset)
    else:
        _alibi_torch(out, slopes, Lq, Lk, causal, q_offset)
    return out


@_alibi_bias_op.register_fake
def _(slopes, Lq, Lk, causal, q_offset, dtype):
    _check_alibi(slopes, Lq, Lk, q_offset, dtype)
    return slopes.new_empty((slopes.shape[0], Lq, Lk), dtype=dtype)


def _alibi_setup_context(ctx, inputs, output):
    slopes, Lq, Lk, causal, q_offset, _ = inputs
    ctx.args = (Lq, Lk, causal, q_offset)
    ctx.slopes_dtype = slopes.dtype


def _alibi_backward(ctx, grad):
    # d bias[h, i, j] / d slope[h] = the distance term: the slope gradient is sum_ij grad * distance.
    Lq, Lk, causal, q_offset = ctx.args
    acc = _acc_dtype(grad.dtype, ctx.slopes_dtype)
    rel = _rel_offsets(Lq, Lk, q_offset, grad.device).to(acc)
    dist = rel if causal else -rel.abs()
    g = (grad.to(acc) * dist).sum(dim=(-2, -1)).to(ctx.slopes_dtype)
    return g, None, None, None, None, None


_alibi_bias_op.register_autograd(_alibi_backward, setup_context=_alibi_setup_context)


@torch.library.custom_op("posenc::t5_relative_bias", mutates_args=())
def _t5_bias_op(
    table: torch.Tensor, Lq: int, Lk: int, bidirectional: bool, max_distance: int, q_offset: int
) -> torch.Tensor:
    """``[H, Lq, Lk]`` = ``table[bucket(j - (q_offset + i)), h]`` in the table's dtype."""
    _check_t5(table, Lq, Lk, q_offset, bidirectional, max_distance)
    if table.shape[1] * Lq * Lk == 0:
        return table.new_empty((table.shape[1], Lq, Lk))
    if resolve_backend(table.device) == "triton":
        out = table.new_empty((table.shape[1], Lq, Lk))
        _t5_triton(out, table, Lq, Lk, q_offset, bidirectional, max_distance)
        return out
    return _t5_torch(table, Lq, Lk, q_offset, bidirectional, max_distance)


@_t5_bias_op.register_fake
def _(table, Lq, Lk, bidirectional, max_distance, q_offset):
    _check_t5(table, Lq, Lk, q_offset, bidirectional, max_distance)
    return table.new_empty((table.shape[1], Lq, Lk))


def _check_t5_backward(grad, num_buckets, Lq, Lk, q_offset, bidirectional, max_distance) -> None:
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, ndim=3)
    _check_bucket_args(num_buckets, max_distance, bidirectional)
    _check_lengths(Lq, Lk, q_offset)
    if tuple(grad.shape[1:]) != (Lq, Lk):
        raise ValueError(f"grad must have shape [H, Lq, Lk] = [H, {Lq}, {Lk}], got {tuple(grad.shape)}")


@torch.library.custom_op("posenc::t5_relative_bias_backward", mutates_args=())
def _t5_bias_backward_op(
    grad: torch.Tensor, num_buckets: int, Lq: int, Lk: int, bidirectional: bool, max_distance: int, q_offset: int
) -> torch.Tensor:
    """Gradient of the table, ``[num_buckets, H]`` in grad's dtype: sums of ``grad`` along each diagonal
    (one relative offset), then over the offsets of each bucket. Deterministic (no atomics)."""
    _check_t5_backward(grad, num_buckets, Lq, Lk, q_offset, bidirectional, max_distance)
    H = grad.shape[0]
    if H == 0 or Lq == 0 or Lk == 0:
        return grad.new_zeros((num_buckets, H))
    if resolve_backend(grad.device) == "triton":
        gtable = grad.new_empty((num_buckets, H))
        _t5_backward_triton(grad, gtable, Lq, Lk, q_offset, bidirectional, max_distance)
        return gtable
    return _t5_backward_torch(grad, num_buckets, Lq, Lk, q_offset, bidirectional, max_distance)


@_t5_bias_backward_op.register_fake
def _(grad, num_buckets, Lq, Lk, bidirectional, max_distance, q_offset):
    _check_t5_backward(grad, num_buckets, Lq, Lk, q_offset, bidirectional, max_distance)
    return grad.new_empty((num_buckets, grad.shape[0]))


def _t5_setup_context(ctx, inputs, output):
    table, Lq, Lk, bidirectional, max_distance, q_offset = inputs
    ctx.args = (table.shape[0], Lq, Lk, bidirectional, max_distance, q_offset)
    ctx.table_dtype = table.dtype


def _t5_backward(ctx, grad):
    g = torch.ops.posenc.t5_relative_bias_backward(grad, *ctx.args)
    return g.to(ctx.table_dtype), None, None, None, None, None


_t5_bias_op.register_autograd(_t5_backward, setup_context=_t5_setup_context)


# ==============================================================================================
# Public functions
# ==============================================================================================


def alibi_slopes(num_heads: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """ALiBi head slopes ``[num_heads]``, the paper's recipe for any head count.

    With ``n = 2 ** floor(log2(H))``: head ``i < n`` gets ``2 ** (-8 (i + 1) / n)``; when H is not a power
    of two, the remaining ``H - n`` heads get every other slope of ``2n`` heads, ``2 ** (-8 (2i + 1) / (2n))``
    (the ALiBi repository's ``get_slopes``, BLOOM's and MPT's code). Computed in float64 and rounded once
    to ``dtype``.

    >>> import posenc_kernels.relative as rel
    >>> rel.alibi_slopes(8)
    tensor([0.5000, 0.2500, 0.1250, 0.0625, 0.0312, 0.0156, 0.0078, 0.0039])
    >>> rel.alibi_slopes(12)[8:]                                 # the extra heads of a 12-head model
    tensor([0.7071, 0.3536, 0.1768, 0.0884])
    """
    if not _is_int(num_heads):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be > 0, got {num_heads}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    n = 1 << (int(num_heads).bit_length() - 1)
    exps = [8.0 * (i + 1) / n for i in range(n)] + [8.0 * (2 * i + 1) / (2 * n) for i in range(num_heads - n)]
    # Exponents are exact binary fractions; exp2 of them in float64, rounded once to dtype.
    return torch.exp2(-torch.tensor(exps, dtype=torch.float64)).to(dtype=dtype, device=device)


def alibi_bias(
    slopes: torch.Tensor,
    Lq: int,
    Lk: int,
    *,
    causal: bool = True,
    q_offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ALiBi attention bias ``[H, Lq, Lk]`` (add it to the scores; it broadcasts over the batch).

    Query ``i`` sits at position ``q_offset + i`` (decode: the cache length), key ``j`` at ``j``.
    ``causal=True``: ``slopes[h] * (j - (q_offset + i))`` - zero on the diagonal, negative for past keys,
    and **positive for future keys**, which the causal mask is expected to remove (the bias is not a mask).
    It differs from BLOOM's ``slope * j`` only by a per-row constant, which softmax ignores.
    ``causal=False``: the symmetric ``-slopes[h] * |j - (q_offset + i)|`` (encoders). Math in fp32 (fp64 for
    ``dtype=torch.float64``), one rounding to ``dtype``. Differentiable w.r.t. ``slopes``.

    >>> import torch, posenc_kernels.relative as rel
    >>> bias = rel.alibi_bias(rel.alibi_slopes(4), 3, 3)
    >>> bias[0]
    tensor([[ 0.0000,  0.2500,  0.5000],
            [-0.2500,  0.0000,  0.2500],
            [-0.5000, -0.2500,  0.0000]])
    >>> rel.alibi_bias(rel.alibi_slopes(4), 1, 5, q_offset=4)[1]    # decode step: one query at position 4
    tensor([[-0.2500, -0.1875, -0.1250, -0.0625,  0.0000]])
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_alibi(slopes, Lq, Lk, q_offset, dtype)  # here too: the op's schema would reject a list or float first
    return torch.ops.posenc.alibi_bias(slopes, Lq, Lk, causal, q_offset, dtype)


def alibi_score_mod(slopes: torch.Tensor, *, causal: bool = True, q_offset: int = 0):
    """FlexAttention ``score_mod`` adding the ALiBi bias of :func:`alibi_bias` to each score.

    Returns ``score_mod(score, b, h, q_idx, kv_idx) -> score + bias``; pair the causal form with a causal
    ``block_mask`` (or mask_mod) as with the dense bias. Compile ``flex_attention`` for a fused kernel.

    >>> import torch, posenc_kernels.relative as rel
    >>> mod = rel.alibi_score_mod(rel.alibi_slopes(4))
    >>> mod(torch.tensor(0.0), 0, torch.tensor(1), torch.tensor(5), torch.tensor(2))
    tensor(-0.1875)
    """
    check_tensor("slopes", slopes, dtypes=FLOAT_DTYPES, ndim=1)
    _check_lengths(0, 0, q_offset)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    def score_mod(score, b, h, q_idx, kv_idx):
        rel = kv_idx - (q_idx + q_offset)
        dist = rel if causal else -rel.abs()
        return score + (slopes[h] * dist).to(score.dtype)

    return score_mod


def t5_relative_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5 bucket of every ``key_pos - query_pos`` in an int tensor of any shape (same shape, same dtype).

    The exact value of T5's bucket formula (HF transformers' ``T5Attention._relative_position_bucket``):
    ``bidirectional`` gives keys after
    the query the upper ``num_buckets / 2`` buckets; per direction, half the buckets are exact distances and
    the rest logarithmic up to ``max_distance`` (farther keys share the last bucket); unidirectional maps
    every key after the query to bucket 0. Computed with the exact integer thresholds of
    :func:`t5_bucket_thresholds` (comparisons only: usable in score_mods and compiled graphs). HF's fp32
    ``log`` gives the same buckets for T5's own settings and every common one (tested on [-1000, 1000]);
    in a few exotic (num_buckets, max_distance) pairs where the log ratio is exactly a bucket boundary -
    e.g. num_buckets=34, max_distance=27 at offset -18, exactly bucket 14 - HF's fp32 rounding lands one
    bucket off and this function keeps the exact value.

    >>> import torch, posenc_kernels.relative as rel
    >>> rel.t5_relative_bucket(torch.tensor([-200, -16, -1, 0, 1, 15, 16, 1000]))
    tensor([15, 10,  1,  0, 17, 25, 26, 31])
    >>> rel.t5_relative_bucket(torch.tensor([-20, 0, 5]), bidirectional=False)
    tensor([17,  0,  0])
    """
    check_tensor("relative_position", relative_position)
    if relative_position.dtype == torch.bool or relative_position.dtype not in INT_DTYPES:
        raise TypeError(f"relative_position must be an integer tensor, got dtype {relative_position.dtype}")
    _check_bucket_args(num_buckets, max_distance, bidirectional)
    half, m, thr = _bucket_layout(int(num_buckets), int(max_distance), bidirectional)
    if torch.iinfo(relative_position.dtype).max < int(num_buckets) - 1:
        raise ValueError(
            f"relative_position's dtype {relative_position.dtype} cannot hold buckets up to {int(num_buckets) - 1}; "
            "pass a wider integer tensor"
        )
    # Computed in int64 whatever the input dtype (|int8(-128)| and friends overflow in their own dtype).
    return _bucket_torch(relative_position.to(torch.int64), half, m, thr, bidirectional).to(relative_position.dtype)


def _resolve_num_buckets(table, num_buckets):
    check_tensor("table", table, dtypes=FLOAT_DTYPES, ndim=2)
    if num_buckets is not None and not _is_int(num_buckets):
        raise TypeError(f"num_buckets must be an int or None, got {type(num_buckets).__name__}")
    return table.shape[0] if num_buckets is None else num_buckets


def t5_relative_bias(
    table: torch.Tensor,
    Lq: int,
    Lk: int,
    *,
    bidirectional: bool = True,
    num_buckets: Optional[int] = None,
    max_distance: int = 128,
    q_offset: int = 0,
) -> torch.Tensor:
    """T5 relative attention bias ``[H, Lq, Lk]`` from the ``[num_buckets, H]`` bucket table.

    ``table`` is the weight of HF's ``relative_attention_bias`` embedding; ``out[h, i, j] =
    table[bucket(j - (q_offset + i)), h]`` (query ``i`` at position ``q_offset + i``: decoding with a cache
    passes the cache length). Encoders use ``bidirectional=True``, decoders ``False``. Output in the table's
    dtype (a lookup: exact). Differentiable w.r.t. ``table`` with a deterministic two-kernel backward.

    >>> import torch, posenc_kernels.relative as rel
    >>> table = torch.arange(32.0)[:, None] * torch.tensor([1.0, -1.0])   # 32 buckets, 2 heads
    >>> rel.t5_relative_bias(table, 3, 4)[0]
    tensor([[ 0., 17., 18., 19.],
            [ 1.,  0., 17., 18.],
            [ 2.,  1.,  0., 17.]])
    >>> rel.t5_relative_bias(table, 1, 4, bidirectional=False, q_offset=3)[1]
    tensor([[-3., -2., -1., -0.]])
    """
    nb = _resolve_num_buckets(table, num_buckets)
    _check_t5(table, Lq, Lk, q_offset, bidirectional, max_distance, nb)
    return torch.ops.posenc.t5_relative_bias(table, Lq, Lk, bidirectional, max_distance, q_offset)


def t5_score_mod(table: torch.Tensor, *, bidirectional: bool = True, max_distance: int = 128, q_offset: int = 0):
    """FlexAttention ``score_mod`` adding the T5 bias of :func:`t5_relative_bias` (same bucket thresholds).

    >>> import torch, posenc_kernels.relative as rel
    >>> table = torch.arange(32.0)[:, None].repeat(1, 2)
    >>> mod = rel.t5_score_mod(table)
    >>> mod(torch.tensor(0.5), 0, torch.tensor(0), torch.tensor(2), torch.tensor(0))   # key 2 before the query
    tensor(2.5000)
    """
    _check_t5(table, 0, 0, q_offset, bidirectional, max_distance)
    half, m, thr = _bucket_layout(table.shape[0], int(max_distance), bidirectional)

    def score_mod(score, b, h, q_idx, kv_idx):
        bucket = _bucket_torch(kv_idx - (q_idx + q_offset), half, m, thr, bidirectional)
        return score + table[bucket, h].to(score.dtype)

    return score_mod


# ==============================================================================================
# nn.Module
# ==============================================================================================


class T5RelativePositionBias(torch.nn.Module):
    """The learned T5 bias as a module; ``relative_attention_bias.weight`` has HF's name and layout, so an
    HF T5 attention layer's weights load directly.

    >>> import torch, posenc_kernels.relative as rel
    >>> mod = rel.T5RelativePositionBias(num_heads=8)
    >>> mod(5, 7).shape
    torch.Size([8, 5, 7])
    """

    def __init__(self, num_heads: int, *, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        _check_bucket_args(num_buckets, max_distance, bidirectional)
        if not _is_int(num_heads) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = torch.nn.Embedding(num_buckets, num_heads)

    def forward(self, Lq: int, Lk: int, q_offset: int = 0) -> torch.Tensor:
        return t5_relative_bias(
            self.relative_attention_bias.weight, Lq, Lk,
            bidirectional=self.bidirectional, max_distance=self.max_distance, q_offset=q_offset,
        )  # fmt: skip

    def score_mod(self, q_offset: int = 0):
        return t5_score_mod(
            self.relative_attention_bias.weight, bidirectional=self.bidirectional, max_distance=self.max_distance,
            q_offset=q_offset,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"
