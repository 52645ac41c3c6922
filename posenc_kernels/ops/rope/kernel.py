"""RoPE Triton kernels and their launchers: one program rotates ``BLOCK_T`` tokens x ``BLOCK_H`` heads of q
*or* k (the grid's head-block axis covers q's blocks then k's), so q and k take one launch.
"""

from __future__ import annotations

from ..checks import I32_MAX, cdiv, device_guard, max_element_offset, next_pow2, prev_pow2
from ..positions import launch_args, token_positions_tl
from ..registry import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ..angles import exact_angle_tl

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, inv_ptr, pos_ptr, off_ptr, axis_ptr,
        seqlen, n_s_blocks, n_heads_q, n_heads_k, n_rows, offset, n_seqs, attention_factor,
        stride_q_b, stride_q_s, stride_q_h, stride_q_d,
        stride_k_b, stride_k_s, stride_k_h, stride_k_d,
        stride_qo_b, stride_qo_s, stride_qo_h, stride_qo_d,
        stride_ko_b, stride_ko_s, stride_ko_h, stride_ko_d,
        stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f,
        stride_pos_a, stride_pos_b, stride_pos_s, stride_off, stride_axis,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TAIL: tl.constexpr, BLOCK_TAIL: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, POS_MODE: tl.constexpr, SEQ_OFFSETS: tl.constexpr,
        CU_BLOCK: tl.constexpr, N_AXES: tl.constexpr, ANGLES: tl.constexpr, INTERLEAVED: tl.constexpr,
        CONJUGATE: tl.constexpr, COPY_TAIL: tl.constexpr, INPLACE: tl.constexpr, IDX64: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Grid: (B * token blocks, q head blocks + k head blocks). ``b`` and the token block come from one
        32-bit scalar division per program; tokens are ``s`` within sequence ``b`` (packed inputs:
        ``b = 0``). q and k programs run one body (their pointers and strides are selected per program, not
        branched on), in this order: the head rows' loads, the positions, the cos/sin rows (or
        frequencies), and only then any math. So every load that does not depend on another is in flight
        at once: one round trip, two when a position is itself loaded (tests/test_static_sass.py)."""
        pid = tl.program_id(0)
        pid_h = tl.program_id(1)
        b = pid // n_s_blocks
        s = (pid - b * n_s_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        n_q_blocks = tl.cdiv(n_heads_q, BLOCK_H)
        is_q = pid_h < n_q_blocks
        x_ptr = tl.where(is_q, q_ptr, k_ptr)
        o_ptr = tl.where(is_q, qo_ptr, ko_ptr)
        h = tl.where(is_q, pid_h, pid_h - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        n_heads = tl.where(is_q, n_heads_q, n_heads_k)
        sxb = tl.where(is_q, stride_q_b, stride_k_b)
        sxs = tl.where(is_q, stride_q_s, stride_k_s)
        sxh = tl.where(is_q, stride_q_h, stride_k_h)
        sxd = tl.where(is_q, stride_q_d, stride_k_d)
        if IDX64:  # the launcher found an element offset that may not fit in 32 bits
            b = b.to(tl.int64)
            s = s.to(tl.int64)
            h = h.to(tl.int64)
        tok_mask = s < seqlen
        # ---- 1. the head rows (in place, the same address chain serves the stores)
        x_row = b * sxb + s[:, None, None] * sxs + h[None, :, None] * sxh  # [BLOCK_T, BLOCK_H, 1]
        row_mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None]
        if INTERLEAVED:
            ch = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
            m = row_mask & (ch < 2 * HALF)
            x = tl.load(x_ptr + x_row + ch * sxd, mask=m, other=0.0)
        else:
            ch = tl.arange(0, BLOCK_HALF)[None, None, :]
            m = row_mask & (ch < HALF)
            x1 = tl.load(x_ptr + x_row + ch * sxd, mask=m, other=0.0)
            x2 = tl.load(x_ptr + x_row + (HALF + ch) * sxd, mask=m, other=0.0)
        if COPY_TAIL:  # out of place with partial rotary: channels [R, D) pass through unchanged
            ct = tl.arange(0, BLOCK_TAIL)[None, None, :]
            mt = row_mask & (ct < TAIL)
            tail = tl.load(x_ptr + x_row + (2 * HALF + ct) * sxd, mask=mt, other=0.0)
        # A fence: nothing below (position selects, table loads, math) is hoisted above the head loads, and
        # no head load sinks below it; LLVM and ptxas otherwise reorder them (M-RoPE: a round trip more).
        tl.debug_barrier()
        # ---- 2. positions: [BLOCK_T, 1], or [BLOCK_T, BLOCK_HALF] per frequency axis
        c = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = c < HALF
        if N_AXES > 0:
            # Frequency i follows axis axis_map[i] (M-RoPE sections, 2-D axial RoPE). Every axis's
            # positions are loaded beside the map (not at an address read from it), then selected. An
            # axis outside positions (reachable only with value checks off) becomes position -1: NaN.
            ax = tl.load(axis_ptr + c * stride_axis, mask=cmask, other=-1)
            tok_off = b * stride_pos_b + s * stride_pos_s
            pos = tl.full([BLOCK_T, BLOCK_HALF], -1, tl.int64)
            for a in tl.static_range(N_AXES):
                p_a = tl.load(pos_ptr + a * stride_pos_a + tok_off, mask=tok_mask, other=0).to(tl.int64)
                pos = tl.where(ax == a, p_a[:, None], pos)
        else:
            pos = token_positions_tl(
                b, s, tok_mask, pos_ptr, stride_pos_b, stride_pos_s, off_ptr, stride_off, offset, n_seqs,
                CU_BLOCK, POS_MODE, SEQ_OFFSETS,
            )[:, None]  # fmt: skip
        # ---- 3. cos/sin in ACC, [BLOCK_T, BLOCK_HALF]
        if ANGLES == 0:
            # Rows outside the table read as NaN (reachable only when host-side value checks are skipped):
            # a loud result instead of an out-of-bounds read.
            cm = tok_mask[:, None] & (pos >= 0) & (pos < n_rows) & cmask
            if not IDX64:  # the launcher counted the table too: a row offset fits in 32 bits
                pos = pos.to(tl.int32)
            cos = tl.load(cos_ptr + pos * stride_cos_p + c * stride_cos_f, mask=cm, other=float("nan"))
            sin = tl.load(sin_ptr + pos * stride_sin_p + c * stride_sin_f, mask=cm, other=float("nan"))
        else:
            inv = tl.load(inv_ptr + c, mask=cmask, other=0.0)
        # Every load is issued by now: a fence, so no load sinks below the math or a conversion of another
        # (a table row's cast to ACC, converted through shared memory, would otherwise sit between cos and
        # sin on Triton 3.6).
        tl.debug_barrier()
        if ANGLES == 0:
            cos = cos.to(ACC)
            sin = sin.to(ACC)
        else:
            if ANGLES == 1:
                angle = pos.to(tl.float32) * inv.to(tl.float32)  # HF numerics: one fp32 product
            else:
                angle = exact_angle_tl(pos, inv)
            if N_AXES > 0:
                angle = tl.where(pos >= 0, angle, float("nan"))  # only a bad axis makes pos < 0 here
            cos = (tl.cos(angle) * attention_factor).to(ACC)
            sin = (tl.sin(angle) * attention_factor).to(ACC)
        if CONJUGATE:
            sin = -sin
        c3 = cos[:, None, :]
        s3 = sin[:, None, :]
        # ---- 4. rotate and store
        if INPLACE:
            o_row = x_row
            od = sxd
        else:
            sob = tl.where(is_q, stride_qo_b, stride_ko_b)
            sos = tl.where(is_q, stride_qo_s, stride_ko_s)
            soh = tl.where(is_q, stride_qo_h, stride_ko_h)
            o_row = b * sob + s[:, None, None] * sos + h[None, :, None] * soh
            od = tl.where(is_q, stride_qo_d, stride_ko_d)
        if INTERLEAVED:
            x_even, x_odd = tl.split(tl.reshape(x.to(ACC), [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
            o_even = x_even * c3 - x_odd * s3
            o_odd = x_odd * c3 + x_even * s3
            out = tl.reshape(tl.join(o_even, o_odd), [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF])
            tl.store(o_ptr + o_row + ch * od, out.to(o_ptr.dtype.element_ty), mask=m)
        else:
            a1 = x1.to(ACC)
            a2 = x2.to(ACC)
            tl.store(o_ptr + o_row + ch * od, (a1 * c3 - a2 * s3).to(o_ptr.dtype.element_ty), mask=m)
            tl.store(o_ptr + o_row + (HALF + ch) * od, (a2 * c3 + a1 * s3).to(o_ptr.dtype.element_ty), mask=m)
        if COPY_TAIL:
            tl.store(o_ptr + o_row + (2 * HALF + ct) * od, tail, mask=mt)

    @triton.jit
    def rope_angles_tl(
        b, s, tok_mask, pos_ptr, stride_pos_a, stride_pos_b, stride_pos_s, off_ptr, stride_off, offset, n_seqs,
        axis_ptr, stride_axis, cos_ptr, sin_ptr, stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f, inv_ptr,
        n_rows, attention_factor,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, CU_BLOCK: tl.constexpr, POS_MODE: tl.constexpr,
        SEQ_OFFSETS: tl.constexpr, N_AXES: tl.constexpr, ANGLES: tl.constexpr, IDX64: tl.constexpr,
        ACC: tl.constexpr,
    ):  # fmt: skip
        """cos/sin ``[BLOCK_T, BLOCK_HALF]`` in ACC of tokens ``(b, s)``: steps 2 and 3 of :func:`_rope_kernel`
        (positions, any mode or an axis map; then table rows or on-the-fly angles, HF's fp32 product or the
        exact algorithm, times attention_factor) for kernels that fuse RoPE after other work (qknorm). Rows
        outside the table, and a bad axis, give NaN. Its loads are issued together, before any math."""
        c = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = c < HALF
        if N_AXES > 0:
            ax = tl.load(axis_ptr + c * stride_axis, mask=cmask, other=-1)
            tok_off = b * stride_pos_b + s * stride_pos_s
            pos = tl.full([s.shape[0], BLOCK_HALF], -1, tl.int64)
            for a in tl.static_range(N_AXES):
                p_a = tl.load(pos_ptr + a * stride_pos_a + tok_off, mask=tok_mask, other=0).to(tl.int64)
                pos = tl.where(ax == a, p_a[:, None], pos)
        else:
            pos = token_positions_tl(
                b, s, tok_mask, pos_ptr, stride_pos_b, stride_pos_s, off_ptr, stride_off, offset, n_seqs,
                CU_BLOCK, POS_MODE, SEQ_OFFSETS,
            )[:, None]  # fmt: skip
        if ANGLES == 0:
            cm = tok_mask[:, None] & (pos >= 0) & (pos < n_rows) & cmask
            if not IDX64:
                pos = pos.to(tl.int32)
            cos = tl.load(cos_ptr + pos * stride_cos_p + c * stride_cos_f, mask=cm, other=float("nan")).to(ACC)
            sin = tl.load(sin_ptr + pos * stride_sin_p + c * stride_sin_f, mask=cm, other=float("nan")).to(ACC)
        else:
            inv = tl.load(inv_ptr + c, mask=cmask, other=0.0)
            if ANGLES == 1:
                angle = pos.to(tl.float32) * inv.to(tl.float32)  # HF numerics: one fp32 product
            else:
                angle = exact_angle_tl(pos, inv)
            if N_AXES > 0:
                angle = tl.where(pos >= 0, angle, float("nan"))
            cos = (tl.cos(angle) * attention_factor).to(ACC)
            sin = (tl.sin(angle) * attention_factor).to(ACC)
        return cos, sin

    @triton.jit
    def _rope_cos_sin_kernel(
        pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, n_pos, half, attention_factor,
        BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
    ):  # fmt: skip
        """cos/sin[p, f] = attention_factor * cos/sin(fp32(pos[p]) * inv_freq[f]): one fp32 product per angle."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        pm = p < n_pos
        fm = f < half
        pos = tl.load(pos_ptr + p, mask=pm, other=0).to(tl.float32)
        inv = tl.load(inv_freq_ptr + f, mask=fm, other=0.0).to(tl.float32)
        angle = pos[:, None] * inv[None, :]
        m = pm[:, None] & fm[None, :]
        off = p[:, None] * half + f[None, :]
        tl.store(cos_ptr + off, (tl.cos(angle) * attention_factor).to(cos_ptr.dtype.element_ty), mask=m)
        tl.store(sin_ptr + off, (tl.sin(angle) * attention_factor).to(sin_ptr.dtype.element_ty), mask=m)


# (elements per program, elements per thread), by what a program computes per element:
ROPE_TILE = (8192, 64)  # cos/sin rows from tables: 4 warps of 8 tokens x 8 heads x 128 channels
ROPE_TILE_ANGLES = (4096, 64)  # sin/cos computed in the kernel: half the tile, or libdevice's registers spill
ROPE_TILE_AXES = (2048, 32)  # an axis map: per-frequency position selects; more per thread serialises loads


def rope_blocks(half: int, tail: int, heads_q: int, heads_k: int, seqlen: int, tile=ROPE_TILE):
    """``(BLOCK_HALF, BLOCK_TAIL, BLOCK_H, BLOCK_T, num_warps)`` (docs/kernels.md, "Block heuristic").

    A program handles BLOCK_T tokens of one sequence x BLOCK_H heads, each ``width`` channels (rotary ones
    padded to a power of two, plus the copied tail). BLOCK_H covers the smaller head count, so q and k
    programs are alike, capped so a tile holds at most ``tile[0]`` elements; BLOCK_T fills the tile (at most
    16 tokens and the sequence length); ``tile[1]`` elements per thread set the warps. A tile too small for
    a full vector per thread takes more heads instead."""
    tile_elems, per_thread = tile
    block_half = next_pow2(half)
    block_tail = next_pow2(tail) if tail else 0
    width = 2 * block_half + block_tail
    heads = min(heads_q, heads_k) if heads_k > 0 else heads_q
    block_h = min(next_pow2(heads), prev_pow2(max(1, tile_elems // width)))
    block_t = min(16, prev_pow2(max(1, tile_elems // (block_h * width))), next_pow2(seqlen))
    while (block_t * block_h * block_half < 256 and block_h < next_pow2(max(heads_q, heads_k))
           and 2 * block_t * block_h * width <= tile_elems):
        block_h *= 2  # 32 threads x 8 elements (16-bit) per half: full vectors (the extra k heads are masked)
    tile = block_t * block_h * width
    num_warps = prev_pow2(max(1, min(8, tile // (32 * per_thread))))
    return block_half, block_tail, block_h, block_t, num_warps


def angle_launch_args(cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, exact):
    """The angle and position arguments of every RoPE-family launch (``rope_triton``, the QK-norm forward and
    backward): ``(angles, n_rows, inv_freq, tab, pos)`` with ``angles`` the ANGLES code (0 tables, 1 on the
    fly, 2 exact), ``tab`` the two table pointers and their four strides (dummies on the fly: no program
    reads them), and ``pos`` = ``(POS_MODE, positions, their b/s strides, offsets, their stride, offset,
    n_seqs, CU_BLOCK, SEQ_OFFSETS, the axis stride of M-RoPE positions, axis_map's stride, N_AXES)``."""
    if inv_freq is None:
        angles, n_rows = 0, cos.shape[0]
        tab = (cos, sin, cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1))
    else:
        angles, n_rows = (2 if exact else 1), 0
        inv_freq = inv_freq if inv_freq.stride(0) == 1 else inv_freq.contiguous()  # [R/2], read-only
        tab = (inv_freq, inv_freq, 0, 0, 0, 0)
    if axis_map is None:
        mode, pos, spb, sps, off, soff, offset, n_seqs, cu_block, seq_off = launch_args(
            positions, offsets, offset, cu_seqlens
        )
        spos_a = saxis = n_axes = 0
    else:  # positions [A, B, S]: every axis has the first one's layout
        mode, _, spb, sps, off, soff, offset, n_seqs, cu_block, seq_off = launch_args(positions[0], None, 0, None)
        pos, spos_a, saxis, n_axes = positions, positions.stride(0), axis_map.stride(0), positions.shape[0]
    return angles, n_rows, inv_freq, tab, (mode, pos, spb, sps, off, soff, offset, n_seqs, cu_block, seq_off,
                                           spos_a, saxis, n_axes)  # fmt: skip


def rope_triton(q, k, q_out, k_out, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                attention_factor, interleaved, conjugate, exact) -> None:  # fmt: skip
    """Launch for 4-D ``q``/``k`` ``[B, S, H, D]`` (packed inputs arrive as ``B = 1``)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2] if k is not None else 0
    if B * S == 0 or Hq + Hk == 0:
        return
    half = (cos if inv_freq is None else inv_freq).shape[-1]
    angles, n_rows, inv_freq, tab, (mode, pos, spb, sps, off, soff, offset, n_seqs, cu_block, seq_off, spos_a, saxis,
                                    n_axes) = angle_launch_args(cos, sin, inv_freq, positions, offsets, offset,
                                                                cu_seqlens, axis_map, exact)  # fmt: skip
    kk = k if k is not None else q  # dummies when k is absent: no program touches them
    ko = k_out if k_out is not None else q_out
    inplace = q_out is q and (k is None or k_out is k)
    copy_tail = not inplace and 2 * half < D
    tail = D - 2 * half
    block_half, block_tail, block_h, block_t, num_warps = rope_blocks(
        half, tail if copy_tail else 0, Hq, Hk, S,
        ROPE_TILE_AXES if axis_map is not None else ROPE_TILE if angles == 0 else ROPE_TILE_ANGLES,
    )
    # 64-bit offsets only where one may not fit in 32 bits (the tables' rows included)
    tables = (cos, sin) if angles == 0 else ()
    idx64 = max(max_element_offset(t) for t in (q, kk, q_out, ko, *tables)) > I32_MAX
    n_s_blocks = cdiv(S, block_t)
    grid = (B * n_s_blocks, cdiv(Hq, block_h) + cdiv(Hk, block_h))
    with device_guard(q):
        _rope_kernel[grid](
            q, kk, q_out, ko, tab[0], tab[1], inv_freq, pos, off, axis_map,
            S, n_s_blocks, Hq, Hk, n_rows, offset, n_seqs, float(attention_factor),
            *q.stride(), *kk.stride(), *q_out.stride(), *ko.stride(), *tab[2:],
            spos_a, spb, sps, soff, saxis,
            HALF=half, BLOCK_HALF=block_half, TAIL=tail, BLOCK_TAIL=max(block_tail, 1), BLOCK_T=block_t,
            BLOCK_H=block_h, POS_MODE=mode, SEQ_OFFSETS=seq_off, CU_BLOCK=cu_block, N_AXES=n_axes, ANGLES=angles,
            INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_TAIL=copy_tail, INPLACE=inplace, IDX64=idx64,
            ACC=tl.float64 if q.dtype.itemsize == 8 else tl.float32, num_warps=num_warps,
        )  # fmt: skip


def cos_sin_triton(positions, inv_freq, attention_factor, cos, sin) -> None:
    n, half = positions.numel(), inv_freq.shape[0]
    if n == 0 or half == 0:
        return
    pos = positions.reshape(-1)  # positions are O(tokens), never O(tokens x channels)
    inv = inv_freq if inv_freq.stride(0) == 1 else inv_freq.contiguous()
    block_f = min(next_pow2(half), 128)
    block_p = max(1, min(2048 // block_f, next_pow2(n)))
    grid = (cdiv(n, block_p), cdiv(half, block_f))
    with device_guard(positions):
        _rope_cos_sin_kernel[grid](pos, inv, cos, sin, n, half, float(attention_factor), BLOCK_P=block_p, BLOCK_F=block_f)
