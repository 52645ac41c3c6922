"""Learned position embeddings: Triton kernels and their launchers.

* Forward: one program adds ``BLOCK_T`` tokens of one sequence x ``BLOCK_D`` channels of
  ``table[positions]`` to x (any strides); the position and x loads are issued first, then the table row.
* Backward (the table gradient): fp32 atomic adds (fast, summation order unspecified), or a deterministic
  kernel (positions sorted stably, one program per table row summing its tokens in that order).
"""

from __future__ import annotations

import torch

from ..checks import I32_MAX, acc_dtype, cdiv, device_guard, max_element_offset, next_pow2, prev_pow2
from ..positions import PosMode, token_positions_tl
from ..registry import HAS_TRITON

_POSITIONS = int(PosMode.POSITIONS)  # both kernels read explicit positions

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pe_add_kernel(
        x_ptr, out_ptr, table_ptr, pos_ptr,
        seqlen, n_s_blocks, n_rows,
        stride_x_b, stride_x_s, stride_x_d, stride_o_b, stride_o_s, stride_o_d, stride_t_p, stride_t_d,
        stride_pos_b, stride_pos_s,
        D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, POS_MODE: tl.constexpr, IDX64: tl.constexpr,
        ACC: tl.constexpr,
    ):  # fmt: skip
        """out[b, s, d] = x[b, s, d] + table[pos[b, s], d]: the gather and the add in registers, one read
        of x, one write of out. A row outside the table (value checks off) reads as NaN: a loud result,
        never an out-of-bounds read."""
        pid = tl.program_id(0)
        b = pid // n_s_blocks
        s = (pid - b * n_s_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        if IDX64:
            b = b.to(tl.int64)
            s = s.to(tl.int64)
            d = d.to(tl.int64)
        tok_mask = s < seqlen
        pos = token_positions_tl(
            b, s, tok_mask, pos_ptr, stride_pos_b, stride_pos_s, pos_ptr, 0, 0, 0, 0, POS_MODE, False
        )  # fmt: skip
        m = tok_mask[:, None] & (d < D)[None, :]
        xv = tl.load(x_ptr + (b * stride_x_b + s * stride_x_s)[:, None] + d[None, :] * stride_x_d, mask=m, other=0.0)
        if IDX64:
            pos = pos.to(tl.int64)
        row_ok = (pos >= 0) & (pos < n_rows)
        emb = tl.load(
            table_ptr + (pos * stride_t_p)[:, None] + d[None, :] * stride_t_d,
            mask=m & row_ok[:, None],
            other=float("nan"),
        )
        o_off = (b * stride_o_b + s * stride_o_s)[:, None] + d[None, :] * stride_o_d
        tl.store(out_ptr + o_off, (xv.to(ACC) + emb.to(ACC)).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _pe_grad_atomic_kernel(
        g_ptr, acc_ptr, pos_ptr,
        n_batch, seqlen, n_s_blocks, n_rows, padding_idx,
        stride_g_b, stride_g_s, stride_g_d, stride_pos_b, stride_pos_s,
        D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SHARED: tl.constexpr, POS_MODE: tl.constexpr,
        ACC: tl.constexpr,
    ):  # fmt: skip
        """Grid: (sequences x token blocks, channel blocks). Adds the gradient rows of BLOCK_T tokens into
        the fp32 (fp64) accumulator ``acc[P, D]`` (contiguous) with atomics. SHARED ([S] positions, the same
        for every sequence; one "sequence" in the grid): each lane sums g[:, s] over the batch in registers
        first, then makes one atomic add - B times fewer atomics, none contended when positions are
        distinct."""
        pid = tl.program_id(0)
        b = (pid // n_s_blocks).to(tl.int64)
        s = ((pid - b * n_s_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        s_mask = s < seqlen
        gm = s_mask[:, None] & (d < D)[None, :]
        pos = token_positions_tl(
            b, s, s_mask, pos_ptr, stride_pos_b, stride_pos_s, pos_ptr, 0, 0, 0, 0, POS_MODE, False
        )  # fmt: skip
        if SHARED:
            g = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
            bi = 0
            while bi < n_batch:  # while, not range(): Triton 3.6's interpreter cannot range() over int args
                g += tl.load(
                    g_ptr + (bi * stride_g_b + s * stride_g_s)[:, None] + d[None, :] * stride_g_d, mask=gm, other=0.0
                ).to(ACC)
                bi += 1
        else:
            g = tl.load(
                g_ptr + (b * stride_g_b + s * stride_g_s)[:, None] + d[None, :] * stride_g_d, mask=gm, other=0.0
            ).to(ACC)
        pos = pos.to(tl.int64)
        # Rows outside the table (value checks off) and the padding row receive nothing.
        ok = s_mask & (pos >= 0) & (pos < n_rows) & (pos != padding_idx)
        tl.atomic_add(acc_ptr + pos[:, None] * D + d[None, :], g, mask=ok[:, None] & (d < D)[None, :], sem="relaxed")

    @triton.jit
    def _pe_grad_sorted_kernel(
        g_ptr, out_ptr, order_ptr, bounds_ptr,
        n_batch, seqlen, padding_idx,
        stride_g_b, stride_g_s, stride_g_d, stride_o_p, stride_o_d,
        D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SHARED: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Grid: (table rows, channel blocks). Deterministic table gradient, no atomics: row r's tokens are
        ``order[bounds[r]:bounds[r + 1]]`` (positions sorted stably); the program sums their gradient rows
        BLOCK_K at a time in that order with a fixed reduction tree and writes the row once (zeros for the
        padding row and for rows no token reads). SHARED: ``order`` holds sequence positions s, and each
        contributes g[0, s], ..., g[B-1, s]."""
        r = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = d < D
        start = tl.load(bounds_ptr + r)
        end = tl.load(bounds_ptr + r + 1)
        end = tl.where(r == padding_idx, start, end)  # the padding row gets no gradient
        if SHARED:
            nb = n_batch
        else:
            nb = 1
        n_entries = (end - start) * nb
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        # A while loop over the row's entries: data-dependent bounds work in every Triton interpreter (a
        # range() over in-kernel values does not in 3.6's) and compile to the same loop.
        j0 = n_entries * 0
        while j0 < n_entries:
            j = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
            j_mask = j < n_entries
            tok = tl.load(order_ptr + start + j // nb, mask=j_mask, other=0)
            if SHARED:
                b = j - (j // nb) * nb
                s = tok
            else:  # flat token indices from the sort: the division is per entry by nature
                b = tok // seqlen
                s = tok - b * seqlen
            g = tl.load(
                g_ptr + (b * stride_g_b + s * stride_g_s)[:, None] + d[None, :] * stride_g_d,
                mask=j_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(ACC)
            acc += tl.sum(g, axis=0)
            j0 += BLOCK_K
        tl.store(out_ptr + r * stride_o_p + d * stride_o_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


_ELEMS_PER_PROGRAM = 4096


def channel_block(D: int, widest: int) -> int:
    """Channels per program: of the power of two covering D (at most ``widest``), its half and its quarter,
    the one that pads D least, the wider on ties (768 -> 3 x 256, not a half-empty second 512)."""
    top = min(widest, next_pow2(D))
    return min((b for b in (top, top // 2, top // 4) if b >= 1), key=lambda b: (-(-D // b) * b, -b))


def pe_blocks(D: int, n: int, widest: int, cap: int):
    """``(tokens, channels, warps)`` per program: about 4096 elements (16 per thread over 8 warps), up to
    ``widest`` channels (:func:`channel_block`), the rest in tokens (at most ``cap`` and the count ``n``).
    Tokens of a tile share nothing, so the only aim is enough bytes in flight per program."""
    block_d = channel_block(D, widest)
    block_t = max(1, min(_ELEMS_PER_PROGRAM // block_d, next_pow2(n), cap))
    num_warps = prev_pow2(min(8, max(1, block_t * block_d // 512)))
    return block_t, block_d, num_warps


def pe_add_triton(x, out, table, positions) -> None:
    """out = x + table[positions] for ``[B, S, D]`` x/out (out may be x); positions ``[B, S]`` or ``[S]``."""
    B, S, D = x.shape
    if B * S * D == 0:
        return
    spos_b = positions.stride(0) if positions.dim() == 2 else 0
    block_t, block_d, num_warps = pe_blocks(D, S, 512, 64)
    n_s_blocks = cdiv(S, block_t)
    grid = (B * n_s_blocks, cdiv(D, block_d))
    idx64 = max(max_element_offset(t) for t in (x, out, table)) > I32_MAX
    acc = tl.float64 if acc_dtype(x.dtype, table.dtype) == torch.float64 else tl.float32
    with device_guard(x):
        _pe_add_kernel[grid](
            x, out, table, positions,
            S, n_s_blocks, table.shape[0],
            *x.stride(), *out.stride(), *table.stride(), spos_b, positions.stride(-1),
            D=D, BLOCK_T=block_t, BLOCK_D=block_d, POS_MODE=_POSITIONS, IDX64=idx64, ACC=acc, num_warps=num_warps,
        )  # fmt: skip


def grad_table_triton(g, positions, out, padding_idx: int, deterministic: bool) -> None:
    """The table gradient into ``out`` ``[P, D]`` (every element written) for ``g`` ``[B, S, D]``."""
    B, S, D = g.shape
    num_rows = out.shape[0]
    acc = acc_dtype(out.dtype)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    shared = positions.dim() == 1 and B > 1
    if not deterministic:
        buf = out if out.dtype == acc and out.is_contiguous() else torch.empty(num_rows, D, dtype=acc, device=g.device)
        buf.zero_()
        spos_b = positions.stride(0) if positions.dim() == 2 else 0
        block_t, block_d, num_warps = pe_blocks(D, S, 1024, 64)
        n_s_blocks = cdiv(S, block_t)
        grid = ((1 if shared else B) * n_s_blocks, cdiv(D, block_d))
        with device_guard(g):
            _pe_grad_atomic_kernel[grid](
                g, buf, positions, B, S, n_s_blocks, num_rows, padding_idx,
                *g.stride(), spos_b, positions.stride(-1),
                D=D, BLOCK_T=block_t, BLOCK_D=block_d, SHARED=shared, POS_MODE=_POSITIONS, ACC=acc_tl,
                num_warps=num_warps,
            )  # fmt: skip
        if buf is not out:
            out.copy_(buf)
        return
    # Deterministic: stable sort of the rows (token order kept within a row); row r's tokens are
    # order[bounds[r]:bounds[r + 1]]. No host sync: rows outside [0, P) fall outside every range.
    rows = positions.reshape(-1) if shared else positions.expand(B, S).reshape(-1)
    sorted_rows, order = torch.sort(rows.to(torch.int64), stable=True)
    bounds = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=g.device, dtype=torch.int64))
    # A row's entries come BLOCK_K at a time: in the shared case a row has B of them per token, otherwise
    # usually a handful (one per sequence that reaches it), so 8.
    block_k, block_d, num_warps = pe_blocks(D, B * S, 1024, next_pow2(B) if shared else 8)
    grid = (num_rows, cdiv(D, block_d))
    with device_guard(g):
        _pe_grad_sorted_kernel[grid](
            g, out, order, bounds, B, S, padding_idx, *g.stride(), *out.stride(),
            D=D, BLOCK_K=block_k, BLOCK_D=block_d, SHARED=shared, ACC=acc_tl, num_warps=num_warps,
        )  # fmt: skip
