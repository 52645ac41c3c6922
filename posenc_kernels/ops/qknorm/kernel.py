"""The attention prologue's Triton kernel (QK-norm -> RoPE -> KV-cache write, each stage a constexpr flag) and
the QK-norm + RoPE launchers. One program normalises and rotates ``BLOCK_T`` tokens x ``BLOCK_H`` heads of
q *or* k (the grid's head-block axis covers q's blocks then k's, as in the RoPE kernel), so q and k take one
launch. ``norm="heads"`` gives a program all heads of its tokens (the statistics span them). Positions and
angles come from the RoPE family's helper (:func:`..rope.kernel.rope_angles_tl`). Without the norm stage the
rotation is the RoPE kernel's own expression; the cache stage (k's rows into a paged or contiguous cache, v
programs, FP8 quantisation) is launched by :mod:`..cache.kernel`.
"""

from __future__ import annotations

import torch

from ..checks import I32_MAX, cdiv, device_guard, max_element_offset, next_pow2, prev_pow2
from ..registry import HAS_TRITON
from ..rope.kernel import angle_launch_args
from .torch_impl import HEADS

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ..rope.kernel import rope_angles_tl

    @triton.jit
    def _prologue_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, inv_ptr, pos_ptr, off_ptr, axis_ptr,
        v_ptr, kc_ptr, vc_ptr, qf_ptr, idx_ptr, ks_ptr, vs_ptr, qs_ptr,
        seqlen, n_s_blocks, n_heads_q, n_heads_k, n_rows, offset, n_seqs, attention_factor, eps, weight_offset,
        n_slots, block_size, k_scale, k_rcp, v_scale, v_rcp, q_scale, q_rcp,
        stride_q_b, stride_q_s, stride_q_h, stride_q_d,
        stride_k_b, stride_k_s, stride_k_h, stride_k_d,
        stride_qo_b, stride_qo_s, stride_qo_h, stride_qo_d,
        stride_ko_b, stride_ko_s, stride_ko_h, stride_ko_d,
        stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f,
        stride_pos_a, stride_pos_b, stride_pos_s, stride_off, stride_axis,
        stride_v_b, stride_v_s, stride_v_h, stride_v_d,
        stride_kc_o, stride_kc_i, stride_kc_h, stride_vc_o, stride_vc_i, stride_vc_h,
        stride_qf_b, stride_qf_s, stride_qf_h, stride_qf_d,
        stride_idx_b, stride_idx_s, stride_ks, stride_vs, stride_qs,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TAIL: tl.constexpr, BLOCK_TAIL: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, POS_MODE: tl.constexpr, SEQ_OFFSETS: tl.constexpr,
        CU_BLOCK: tl.constexpr, N_AXES: tl.constexpr, ANGLES: tl.constexpr, INTERLEAVED: tl.constexpr,
        NORM: tl.constexpr, NORM_HEADS: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
        INPLACE: tl.constexpr, IDX64: tl.constexpr, ACC: tl.constexpr,
        CACHE: tl.constexpr, SLOT64: tl.constexpr, K_FMAX: tl.constexpr, KS_MODE: tl.constexpr, HAS_V: tl.constexpr,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_HV: tl.constexpr, VS_MODE: tl.constexpr,
        Q_FMAX: tl.constexpr, QS_MODE: tl.constexpr,
    ):  # fmt: skip
        """The attention prologue in one launch: QK-norm (``NORM``) -> RoPE -> KV-cache write (``CACHE``).

        Grid: (B * token blocks, q head blocks + k head blocks [+ v head blocks]). q and k programs run
        :func:`_qk_rows` (their pointers and strides selected per program, not branched on); with ``HAS_V``
        the last ``cdiv(Hk, BLOCK_HV)`` head blocks are v programs (:func:`_v_rows`: v has no angles).
        QK-norm + RoPE (``qk_norm_rope_``) is ``NORM`` without ``CACHE``; RoPE + cache without ``NORM``.
        The stage flags are constexprs: a stage that is off leaves no instruction behind."""
        pid = tl.program_id(0)
        pid_h = tl.program_id(1)
        b = pid // n_s_blocks
        s = (pid - b * n_s_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        n_q_blocks = tl.cdiv(n_heads_q, BLOCK_H)
        n_qk_blocks = n_q_blocks + tl.cdiv(n_heads_k, BLOCK_H)
        if HAS_V and pid_h >= n_qk_blocks:  # a v program (the last cdiv(Hk, BLOCK_HV) head blocks): no angles
            _v_rows(
                pid_h - n_qk_blocks, b, s, v_ptr, vc_ptr, idx_ptr, vs_ptr, seqlen, n_heads_k, n_slots, block_size,
                v_scale, v_rcp, stride_v_b, stride_v_s, stride_v_h, stride_v_d, stride_vc_o, stride_vc_i,
                stride_vc_h, stride_idx_b, stride_idx_s, stride_vs,
                DV, BLOCK_DV, BLOCK_HV, CACHE, SLOT64, K_FMAX, VS_MODE, IDX64,
            )  # fmt: skip
        else:
            _qk_rows(
                pid_h, n_q_blocks, b, s, q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, inv_ptr,
                pos_ptr, off_ptr, axis_ptr, kc_ptr, qf_ptr, idx_ptr, ks_ptr, qs_ptr,
                seqlen, n_heads_q, n_heads_k, n_rows, offset, n_seqs, attention_factor, eps, weight_offset,
                n_slots, block_size, k_scale, k_rcp, q_scale, q_rcp,
                stride_q_b, stride_q_s, stride_q_h, stride_q_d, stride_k_b, stride_k_s, stride_k_h, stride_k_d,
                stride_qo_b, stride_qo_s, stride_qo_h, stride_qo_d, stride_ko_b, stride_ko_s, stride_ko_h,
                stride_ko_d, stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f,
                stride_pos_a, stride_pos_b, stride_pos_s, stride_off, stride_axis,
                stride_kc_o, stride_kc_i, stride_kc_h, stride_qf_b, stride_qf_s, stride_qf_h, stride_qf_d,
                stride_idx_b, stride_idx_s, stride_ks, stride_qs,
                D, HALF, BLOCK_HALF, TAIL, BLOCK_TAIL, BLOCK_T, BLOCK_H, POS_MODE, SEQ_OFFSETS, CU_BLOCK, N_AXES,
                ANGLES, INTERLEAVED, NORM, NORM_HEADS, HAS_QW, HAS_KW, INPLACE, IDX64, ACC,
                CACHE, SLOT64, K_FMAX, KS_MODE, Q_FMAX, QS_MODE,
            )  # fmt: skip

    @triton.jit
    def _qk_rows(
        pid_h, n_q_blocks, b, s, q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, inv_ptr,
        pos_ptr, off_ptr, axis_ptr, kc_ptr, qf_ptr, idx_ptr, ks_ptr, qs_ptr,
        seqlen, n_heads_q, n_heads_k, n_rows, offset, n_seqs, attention_factor, eps, weight_offset,
        n_slots, block_size, k_scale, k_rcp, q_scale, q_rcp,
        stride_q_b, stride_q_s, stride_q_h, stride_q_d, stride_k_b, stride_k_s, stride_k_h, stride_k_d,
        stride_qo_b, stride_qo_s, stride_qo_h, stride_qo_d, stride_ko_b, stride_ko_s, stride_ko_h,
        stride_ko_d, stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f,
        stride_pos_a, stride_pos_b, stride_pos_s, stride_off, stride_axis,
        stride_kc_o, stride_kc_i, stride_kc_h, stride_qf_b, stride_qf_s, stride_qf_h, stride_qf_d,
        stride_idx_b, stride_idx_s, stride_ks, stride_qs,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TAIL: tl.constexpr, BLOCK_TAIL: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, POS_MODE: tl.constexpr, SEQ_OFFSETS: tl.constexpr,
        CU_BLOCK: tl.constexpr, N_AXES: tl.constexpr, ANGLES: tl.constexpr, INTERLEAVED: tl.constexpr,
        NORM: tl.constexpr, NORM_HEADS: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
        INPLACE: tl.constexpr, IDX64: tl.constexpr, ACC: tl.constexpr,
        CACHE: tl.constexpr, SLOT64: tl.constexpr, K_FMAX: tl.constexpr, KS_MODE: tl.constexpr,
        Q_FMAX: tl.constexpr, QS_MODE: tl.constexpr,
    ):  # fmt: skip
        """A q or k program: ``BLOCK_T`` tokens x ``BLOCK_H`` heads. Order: the head rows' loads, the weights,
        the cache rows' slots and the FP8 scales; the positions and cos/sin rows; then the statistics (with
        ``NORM``: fp32, or fp64 for fp64 inputs), the scale ``rstd * (weight_offset + w)``, the rotation of
        channels ``[0, 2*HALF)`` (without ``NORM``: the RoPE kernel's own expression, so the values are bit for
        bit ``apply_rope_``'s), and one cast on store. Channels ``[2*HALF, D)`` are normalised (or passed
        through) unrotated. Rows are masked per head, so a program's extra heads (several heads per program,
        partial rotary) never touch another's.

        ``CACHE`` (1 paged, 2 contiguous; :func:`_cache_rows`): k programs also store the rotated k, as stored
        in k's dtype, into its cache row (an FP8 cache, ``K_FMAX`` its largest finite value: quantised by
        :func:`_quantise`). ``Q_FMAX > 0``: q programs store the rotated q quantised into ``qf`` instead of
        q (q is left as it is)."""
        is_q = pid_h < n_q_blocks
        is_k = pid_h >= n_q_blocks
        x_ptr = tl.where(is_q, q_ptr, k_ptr)
        o_ptr = tl.where(is_q, qo_ptr, ko_ptr)
        w_ptr = tl.where(is_q, qw_ptr, kw_ptr)
        has_w = tl.where(is_q, HAS_QW, HAS_KW)
        h = tl.where(is_q, pid_h, pid_h - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        n_heads = tl.where(is_q, n_heads_q, n_heads_k)
        sxb = tl.where(is_q, stride_q_b, stride_k_b)
        sxs = tl.where(is_q, stride_q_s, stride_k_s)
        sxh = tl.where(is_q, stride_q_h, stride_k_h)
        sxd = tl.where(is_q, stride_q_d, stride_k_d)
        if IDX64:
            b = b.to(tl.int64)
            s = s.to(tl.int64)
            h = h.to(tl.int64)
        tok_mask = s < seqlen
        head_mask = h < n_heads
        x_row = b * sxb + s[:, None, None] * sxs + h[None, :, None] * sxh  # [BLOCK_T, BLOCK_H, 1]
        row_mask = tok_mask[:, None, None] & head_mask[None, :, None]
        if NORM_HEADS:
            w_row = h[None, :, None] * D  # weights [H*D]
        else:
            w_row = h[None, :, None] * 0  # weights [D]
        wmask_h = head_mask[None, :, None] & has_w
        # ---- 1. loads: head rows, weights (rotary pairs, then the unrotated tail)
        if INTERLEAVED:
            ch = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
            m = row_mask & (ch < 2 * HALF)
            x = tl.load(x_ptr + x_row + ch * sxd, mask=m, other=0.0)
            if HAS_QW or HAS_KW:
                w = tl.load(w_ptr + w_row + ch, mask=wmask_h & (ch < 2 * HALF), other=0.0)
        else:
            ch = tl.arange(0, BLOCK_HALF)[None, None, :]
            m = row_mask & (ch < HALF)
            x1 = tl.load(x_ptr + x_row + ch * sxd, mask=m, other=0.0)
            x2 = tl.load(x_ptr + x_row + (HALF + ch) * sxd, mask=m, other=0.0)
            if HAS_QW or HAS_KW:
                w1 = tl.load(w_ptr + w_row + ch, mask=wmask_h & (ch < HALF), other=0.0)
                w2 = tl.load(w_ptr + w_row + HALF + ch, mask=wmask_h & (ch < HALF), other=0.0)
        if TAIL > 0:
            ct = tl.arange(0, BLOCK_TAIL)[None, None, :]
            mt = row_mask & (ct < TAIL)
            if not NORM and INPLACE and Q_FMAX == 0:
                mt = tl.where(is_k, mt, False)  # in place without the norm only k's tail moves (into the cache)
            tail = tl.load(x_ptr + x_row + (2 * HALF + ct) * sxd, mask=mt, other=0.0)
            if HAS_QW or HAS_KW:
                wt = tl.load(w_ptr + w_row + 2 * HALF + ct, mask=wmask_h & (ct < TAIL), other=0.0)
        # ---- the k cache rows (k programs) and the FP8 scales, issued with the head rows
        c_row = 0
        c_on = False
        ksc = 1.0
        kr = 1.0
        qf_row = 0
        qsc = 1.0
        qr = 1.0
        if CACHE > 0:
            outer, inner, valid = _cache_rows(b, s, tl.where(is_k, tok_mask, False), idx_ptr, stride_idx_b,
                                              stride_idx_s, n_slots, block_size, CACHE, SLOT64)  # fmt: skip
            c_row = (outer * stride_kc_o + inner * stride_kc_i)[:, None, None]
            c_row += h.to(tl.int64)[None, :, None] * stride_kc_h  # [BLOCK_T, BLOCK_H, 1], int64
            c_on = tl.where(is_k, valid[:, None, None], False)
            if K_FMAX > 0:
                ksc = _load_scale(ks_ptr, stride_ks, k_scale, h, tl.where(is_k, head_mask, False), KS_MODE)
        if Q_FMAX > 0:
            qf_row = b * stride_qf_b + s[:, None, None] * stride_qf_s + h[None, :, None] * stride_qf_h
            qsc = _load_scale(qs_ptr, stride_qs, q_scale, h, tl.where(is_q, head_mask, False), QS_MODE)
        # A fence, as in the RoPE kernel: no head or weight load sinks below it, nothing below is hoisted.
        tl.debug_barrier()
        # ---- 2. positions and cos/sin [BLOCK_T, BLOCK_HALF]
        cos, sin = rope_angles_tl(
            b, s, tok_mask, pos_ptr, stride_pos_a, stride_pos_b, stride_pos_s, off_ptr, stride_off, offset, n_seqs,
            axis_ptr, stride_axis, cos_ptr, sin_ptr, stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f,
            inv_ptr, n_rows, attention_factor, HALF, BLOCK_HALF, CU_BLOCK, POS_MODE, SEQ_OFFSETS, N_AXES, ANGLES,
            IDX64, ACC,
        )  # fmt: skip
        # Every load is issued by now: a fence, so none sinks below the statistics' reductions.
        tl.debug_barrier()
        if CACHE > 0 and K_FMAX > 0:
            ksc, kr = _scale_rcp(ksc, k_rcp, KS_MODE)
        if Q_FMAX > 0:
            qsc, qr = _scale_rcp(qsc, q_rcp, QS_MODE)
        c3 = cos[:, None, :]
        s3 = sin[:, None, :]
        if INTERLEAVED:
            xa = x.to(ACC)
        else:
            a1 = x1.to(ACC)
            a2 = x2.to(ACC)
        if TAIL > 0:
            at = tail.to(ACC)
        # ---- 3. statistics: sum of squares per head [BLOCK_T, BLOCK_H] (or per token, over all heads)
        if NORM:
            if INTERLEAVED:
                ss = tl.sum(xa * xa, axis=2)
            else:
                ss = tl.sum(a1 * a1, axis=2) + tl.sum(a2 * a2, axis=2)
            if TAIL > 0:
                ss += tl.sum(at * at, axis=2)
            if NORM_HEADS:
                n = n_heads * D
                tot = tl.sum(ss, axis=1)[:, None]  # masked heads contribute 0
            else:
                n = D
                tot = ss
            rstd = (1.0 / tl.sqrt(tot / n + eps))[:, :, None]  # [BLOCK_T, BLOCK_H or 1, 1]
        # ---- 4. scale, rotate, store (q/k in their dtype; the cache; q's FP8 copy instead of q)
        if INPLACE:
            o_row = x_row
            od = sxd
        else:
            sob = tl.where(is_q, stride_qo_b, stride_ko_b)
            sos = tl.where(is_q, stride_qo_s, stride_ko_s)
            soh = tl.where(is_q, stride_qo_h, stride_ko_h)
            o_row = b * sob + s[:, None, None] * sos + h[None, :, None] * soh
            od = tl.where(is_q, stride_qo_d, stride_ko_d)
        om = m
        if Q_FMAX > 0:
            om = tl.where(is_k, m, False)  # q goes to its FP8 copy only
        ety = o_ptr.dtype.element_ty
        if INTERLEAVED:
            y = xa
            if NORM:
                y = y * rstd
            if HAS_QW or HAS_KW:
                y = y * tl.where(has_w, w.to(ACC) + weight_offset, 1.0)
            y_even, y_odd = tl.split(tl.reshape(y, [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
            o_even = y_even * c3 - y_odd * s3
            o_odd = y_odd * c3 + y_even * s3
            out = tl.reshape(tl.join(o_even, o_odd), [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF]).to(ety)
            tl.store(o_ptr + o_row + ch * od, out, mask=om)
            if CACHE > 0 or Q_FMAX > 0:
                _side_stores(out, ch, m, kc_ptr, c_row, c_on, ksc, kr, qf_ptr, qf_row, stride_qf_d, is_q, qsc, qr,
                             CACHE, K_FMAX, Q_FMAX)  # fmt: skip
        else:
            y1 = a1
            y2 = a2
            if NORM:
                y1 = y1 * rstd
                y2 = y2 * rstd
            if HAS_QW or HAS_KW:
                y1 = y1 * tl.where(has_w, w1.to(ACC) + weight_offset, 1.0)
                y2 = y2 * tl.where(has_w, w2.to(ACC) + weight_offset, 1.0)
            p1 = o_ptr + o_row + ch * od  # each store's address, then its value (qk_norm_rope's order: its SASS)
            out1 = (y1 * c3 - y2 * s3).to(ety)
            tl.store(p1, out1, mask=om)
            p2 = o_ptr + o_row + (HALF + ch) * od
            out2 = (y2 * c3 + y1 * s3).to(ety)
            tl.store(p2, out2, mask=om)
            if CACHE > 0 or Q_FMAX > 0:
                _side_stores(out1, ch, m, kc_ptr, c_row, c_on, ksc, kr, qf_ptr, qf_row, stride_qf_d, is_q, qsc, qr,
                             CACHE, K_FMAX, Q_FMAX)  # fmt: skip
                _side_stores(out2, HALF + ch, m, kc_ptr, c_row, c_on, ksc, kr, qf_ptr, qf_row, stride_qf_d, is_q,
                             qsc, qr, CACHE, K_FMAX, Q_FMAX)  # fmt: skip
        if TAIL > 0:
            if NORM:
                yt = at * rstd
                if HAS_QW or HAS_KW:
                    yt = yt * tl.where(has_w, wt.to(ACC) + weight_offset, 1.0)
                outt = yt.to(ety)
            else:
                outt = tail  # unrotated and not normalised: passed through as it is
            if NORM or not INPLACE:
                omt = mt
                if Q_FMAX > 0:
                    omt = tl.where(is_k, mt, False)
                tl.store(o_ptr + o_row + (2 * HALF + ct) * od, outt, mask=omt)
            if CACHE > 0 or Q_FMAX > 0:
                _side_stores(outt, 2 * HALF + ct, mt, kc_ptr, c_row, c_on, ksc, kr, qf_ptr, qf_row, stride_qf_d, is_q,
                             qsc, qr, CACHE, K_FMAX, Q_FMAX)  # fmt: skip

    @triton.jit
    def _v_rows(
        hb, b, s, v_ptr, vc_ptr, idx_ptr, vs_ptr, seqlen, n_heads_k, n_slots, block_size, v_scale, v_rcp,
        stride_v_b, stride_v_s, stride_v_h, stride_v_d, stride_vc_o, stride_vc_i, stride_vc_h, stride_idx_b,
        stride_idx_s, stride_vs,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_HV: tl.constexpr, CACHE: tl.constexpr, SLOT64: tl.constexpr,
        FMAX: tl.constexpr, VS_MODE: tl.constexpr, IDX64: tl.constexpr,
    ):  # fmt: skip
        """A v program: ``BLOCK_T`` tokens x ``BLOCK_HV`` heads of v copied into their v-cache rows (quantised
        for an FP8 cache, ``FMAX`` > 0), ``BLOCK_DV`` channels at a time. The slots, the scales and v's rows
        are independent loads: one round trip."""
        hv = hb * BLOCK_HV + tl.arange(0, BLOCK_HV)
        if IDX64:
            b = b.to(tl.int64)
            s = s.to(tl.int64)
            hv = hv.to(tl.int64)
        tok_mask = s < seqlen
        head_mask = hv < n_heads_k
        outer, inner, valid = _cache_rows(b, s, tok_mask, idx_ptr, stride_idx_b, stride_idx_s, n_slots, block_size,
                                          CACHE, SLOT64)  # fmt: skip
        v_row = b * stride_v_b + s[:, None, None] * stride_v_s + hv[None, :, None] * stride_v_h
        c_row = (outer * stride_vc_o + inner * stride_vc_i)[:, None, None]
        c_row += hv.to(tl.int64)[None, :, None] * stride_vc_h
        wm = (valid & tok_mask)[:, None, None] & head_mask[None, :, None]
        if FMAX > 0:
            vsc = _load_scale(vs_ptr, stride_vs, v_scale, hv, head_mask, VS_MODE)
        for d0 in tl.static_range(0, DV, BLOCK_DV):
            cv = d0 + tl.arange(0, BLOCK_DV)[None, None, :]
            vm = wm & (cv < DV)
            x = tl.load(v_ptr + v_row + cv * stride_v_d, mask=vm, other=0.0)
            if FMAX > 0:
                if d0 == 0:
                    tl.debug_barrier()  # the scale's reciprocal after v's loads are issued
                    vsc, vr = _scale_rcp(vsc, v_rcp, VS_MODE)
                x = _quantise(x, vsc, vr, FMAX)
            tl.store(vc_ptr + c_row + cv, x.to(vc_ptr.dtype.element_ty), mask=vm)

    @triton.jit
    def _side_stores(out, ch, m, kc_ptr, c_row, c_on, ksc, kr, qf_ptr, qf_row, stride_qf_d, is_q, qsc, qr,
                     CACHE: tl.constexpr, K_FMAX: tl.constexpr, Q_FMAX: tl.constexpr):  # fmt: skip
        """The rotated values ``out`` (as stored in q/k) of channels ``ch``: into the k cache rows (k programs,
        written tokens; quantised for an FP8 cache) and into q's FP8 copy (q programs). One quantisation
        serves both when they share the format."""
        if K_FMAX > 0 and Q_FMAX == K_FMAX:  # FP8 cache and FP8 q of one format: one quantisation
            val = _quantise(out, tl.where(is_q, qsc, ksc), tl.where(is_q, qr, kr), K_FMAX)
            tl.store(kc_ptr + c_row + ch, val.to(kc_ptr.dtype.element_ty), mask=m & c_on)
            tl.store(qf_ptr + qf_row + ch * stride_qf_d, val.to(qf_ptr.dtype.element_ty), mask=tl.where(is_q, m, False))
        else:
            if CACHE > 0:
                if K_FMAX > 0:
                    kv = _quantise(out, ksc, kr, K_FMAX).to(kc_ptr.dtype.element_ty)
                else:
                    kv = out
                tl.store(kc_ptr + c_row + ch, kv, mask=m & c_on)
            if Q_FMAX > 0:
                qv = _quantise(out, qsc, qr, Q_FMAX).to(qf_ptr.dtype.element_ty)
                tl.store(qf_ptr + qf_row + ch * stride_qf_d, qv, mask=tl.where(is_q, m, False))

    @triton.jit
    def _cache_rows(b, s, tok_mask, idx_ptr, stride_idx_b, stride_idx_s, n_slots, block_size,
                    CACHE: tl.constexpr, SLOT64: tl.constexpr):  # fmt: skip
        """The cache row of tokens ``(b, s)`` ``[BLOCK_T]``: ``(outer, inner)`` in int64 (caches outgrow 2**31
        elements) and whether it is written. Paged (``CACHE == 1``): slot ``idx[s]`` (-1, and tokens past
        ``n_slots``, not written), ``outer = slot // block_size``, ``inner = slot % block_size``, divided in 32
        bits unless the cache has more than 2**31 slots (``SLOT64``). Contiguous (``CACHE == 2``): sequence
        ``b``, position ``idx[b, s]`` (-1: not written)."""
        if CACHE == 1:
            slot = tl.load(idx_ptr + s * stride_idx_s, mask=tok_mask & (s < n_slots), other=-1)
            valid = slot >= 0
            if SLOT64:
                slot = tl.maximum(slot, 0).to(tl.int64)
            else:
                slot = tl.maximum(slot, 0).to(tl.int32)
            outer = slot // block_size
            inner = slot - outer * block_size
        else:
            p = tl.load(idx_ptr + b * stride_idx_b + s * stride_idx_s, mask=tok_mask, other=-1)
            valid = p >= 0
            outer = b + s * 0
            inner = tl.maximum(p, 0)
        return outer.to(tl.int64), inner.to(tl.int64), valid

    @triton.jit
    def _load_scale(ptr, stride, value, h, mask, MODE: tl.constexpr):
        """A program's FP8 scale, issued with the head rows: MODE 1 a tensor (0-d / ``[1]``: stride 0, or per
        head), ``[1, BLOCK_H, 1]`` as stored; MODE 2 a float (the fp32 value the launcher passed)."""
        if MODE == 1:
            return tl.load(ptr + h * stride, mask=mask, other=1.0)[None, :, None]
        else:
            return value

    @triton.jit
    def _scale_rcp(sc, rcp, MODE: tl.constexpr):
        """``(scale, 1 / scale)`` in fp32, the reciprocal correctly rounded: a tensor's from :func:`_rcp_rn`
        (once per head, after every load is issued), a float's from the host."""
        if MODE == 1:
            s32 = sc.to(tl.float32)
            return s32, _rcp_rn(s32)
        else:
            return sc, rcp

    @triton.jit
    def _rcp_rn(s):
        """The correctly rounded fp32 ``1 / s`` (``s`` > 0, normal) without a division's slow-path call: an
        approximate fp32 reciprocal refined by two Newton steps in fp64 (relative error about 2**-53), rounded
        once. ``1 / s`` is never an fp32 rounding midpoint, nor within about 2**-48 (relative) of one (``s *
        M`` for a 25-bit midpoint ``M`` is an odd multiple of 2**-47 of its binade), so that rounding is exact."""
        r = (1.0 / s).to(tl.float64)
        s64 = s.to(tl.float64)
        r = tl.fma(r, tl.fma(-s64, r, 1.0), r)
        r = tl.fma(r, tl.fma(-s64, r, 1.0), r)
        return r.to(tl.float32)

    @triton.jit
    def _quantise(x, sc, rcp, FMAX: tl.constexpr):
        """``fp32(x) / sc`` correctly rounded (Markstein: ``q0 = x * rcp``, the exact residual ``x - q0 * sc``
        by fma, one correction; ``rcp`` the correctly rounded ``1 / sc``), clamped to +-FMAX (NaN stays
        NaN): what torch's ``(x.float() / s).clamp(-m, m)`` gives, before the cast to FP8 (round to nearest
        even). ``q0`` is kept where it is exact (the residual is 0: keeps the sign of -0) or far out of range
        (the correction of an infinite ``q0`` is NaN; such values clamp anyway)."""
        xf = x.to(tl.float32)
        q0 = xf * rcp
        e = tl.fma(-q0, sc, xf)
        q1 = tl.fma(e, rcp, q0)
        q = tl.where((e == 0.0) | (tl.abs(q0) > 2.0 * FMAX), q0, q1)
        return tl.clamp(q, -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)


    @triton.jit
    def _qk_norm_rope_bwd_kernel(
        q_ptr, k_ptr, gq_ptr, gk_ptr, dq_ptr, dk_ptr, qw_ptr, kw_ptr, dwq_ptr, dwk_ptr,
        cos_ptr, sin_ptr, inv_ptr, pos_ptr, off_ptr, axis_ptr,
        seqlen, n_s_blocks, n_heads_q, n_heads_k, n_rows, offset, n_seqs, attention_factor, eps, weight_offset,
        stride_q_b, stride_q_s, stride_q_h, stride_q_d,
        stride_k_b, stride_k_s, stride_k_h, stride_k_d,
        stride_gq_b, stride_gq_s, stride_gq_h, stride_gq_d,
        stride_gk_b, stride_gk_s, stride_gk_h, stride_gk_d,
        stride_dq_b, stride_dq_s, stride_dq_h, stride_dq_d,
        stride_dk_b, stride_dk_s, stride_dk_h, stride_dk_d,
        stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f,
        stride_pos_a, stride_pos_b, stride_pos_s, stride_off, stride_axis, stride_dwq, stride_dwk,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TAIL: tl.constexpr, BLOCK_TAIL: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, POS_MODE: tl.constexpr, SEQ_OFFSETS: tl.constexpr,
        CU_BLOCK: tl.constexpr, N_AXES: tl.constexpr, ANGLES: tl.constexpr, INTERLEAVED: tl.constexpr,
        NORM_HEADS: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, NEED_QW: tl.constexpr,
        NEED_KW: tl.constexpr, IDX64: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Backward of :func:`_prologue_kernel` (QK-norm + RoPE), one program per forward program: the upstream gradient
        rotated back (by -theta), ``gh = dz * (weight_offset + w)``, ``dx = rstd * (gh - x_hat * mean(gh *
        x_hat))`` (the mean over the forward's statistics: a head, or all heads of a token), stored in dq/dk
        (fresh tensors); the weight's gradient ``sum(dz * x_hat)`` over this program's
        tokens (and heads, per-head norm) written as one row of a per-program buffer, summed afterwards in a
        fixed order: deterministic, no atomics."""
        pid = tl.program_id(0)
        pid_h = tl.program_id(1)
        b = pid // n_s_blocks
        s = (pid - b * n_s_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        n_q_blocks = tl.cdiv(n_heads_q, BLOCK_H)
        is_q = pid_h < n_q_blocks
        hb = tl.where(is_q, pid_h, pid_h - n_q_blocks)
        x_ptr = tl.where(is_q, q_ptr, k_ptr)
        g_ptr = tl.where(is_q, gq_ptr, gk_ptr)
        o_ptr = tl.where(is_q, dq_ptr, dk_ptr)
        w_ptr = tl.where(is_q, qw_ptr, kw_ptr)
        dw_ptr = tl.where(is_q, dwq_ptr, dwk_ptr)
        has_w = tl.where(is_q, HAS_QW, HAS_KW)
        need_w = tl.where(is_q, NEED_QW, NEED_KW)
        n_blocks_x = tl.where(is_q, n_q_blocks, tl.cdiv(n_heads_k, BLOCK_H))
        dw_row = (pid * n_blocks_x + hb) * tl.where(is_q, stride_dwq, stride_dwk)
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        n_heads = tl.where(is_q, n_heads_q, n_heads_k)
        sxb = tl.where(is_q, stride_q_b, stride_k_b)
        sxs = tl.where(is_q, stride_q_s, stride_k_s)
        sxh = tl.where(is_q, stride_q_h, stride_k_h)
        sxd = tl.where(is_q, stride_q_d, stride_k_d)
        sgb = tl.where(is_q, stride_gq_b, stride_gk_b)
        sgs = tl.where(is_q, stride_gq_s, stride_gk_s)
        sgh = tl.where(is_q, stride_gq_h, stride_gk_h)
        sgd = tl.where(is_q, stride_gq_d, stride_gk_d)
        if IDX64:
            b = b.to(tl.int64)
            s = s.to(tl.int64)
            h = h.to(tl.int64)
        tok_mask = s < seqlen
        head_mask = h < n_heads
        x_row = b * sxb + s[:, None, None] * sxs + h[None, :, None] * sxh
        g_row = b * sgb + s[:, None, None] * sgs + h[None, :, None] * sgh
        row_mask = tok_mask[:, None, None] & head_mask[None, :, None]
        if NORM_HEADS:
            w_row = h[None, :, None] * D
        else:
            w_row = h[None, :, None] * 0
        wmask_h = head_mask[None, :, None] & has_w
        if INTERLEAVED:
            ch = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
            cm = ch < 2 * HALF
            m = row_mask & cm
            x = tl.load(x_ptr + x_row + ch * sxd, mask=m, other=0.0)
            g = tl.load(g_ptr + g_row + ch * sgd, mask=m, other=0.0)
            if HAS_QW or HAS_KW:
                w = tl.load(w_ptr + w_row + ch, mask=wmask_h & cm, other=0.0)
        else:
            ch = tl.arange(0, BLOCK_HALF)[None, None, :]
            cm = ch < HALF
            m = row_mask & cm
            x1 = tl.load(x_ptr + x_row + ch * sxd, mask=m, other=0.0)
            x2 = tl.load(x_ptr + x_row + (HALF + ch) * sxd, mask=m, other=0.0)
            g1 = tl.load(g_ptr + g_row + ch * sgd, mask=m, other=0.0)
            g2 = tl.load(g_ptr + g_row + (HALF + ch) * sgd, mask=m, other=0.0)
            if HAS_QW or HAS_KW:
                w1 = tl.load(w_ptr + w_row + ch, mask=wmask_h & cm, other=0.0)
                w2 = tl.load(w_ptr + w_row + HALF + ch, mask=wmask_h & cm, other=0.0)
        if TAIL > 0:
            ct = tl.arange(0, BLOCK_TAIL)[None, None, :]
            mt = row_mask & (ct < TAIL)
            tail = tl.load(x_ptr + x_row + (2 * HALF + ct) * sxd, mask=mt, other=0.0)
            gt = tl.load(g_ptr + g_row + (2 * HALF + ct) * sgd, mask=mt, other=0.0)
            if HAS_QW or HAS_KW:
                wt = tl.load(w_ptr + w_row + 2 * HALF + ct, mask=wmask_h & (ct < TAIL), other=0.0)
        tl.debug_barrier()
        cos, sin = rope_angles_tl(
            b, s, tok_mask, pos_ptr, stride_pos_a, stride_pos_b, stride_pos_s, off_ptr, stride_off, offset, n_seqs,
            axis_ptr, stride_axis, cos_ptr, sin_ptr, stride_cos_p, stride_cos_f, stride_sin_p, stride_sin_f,
            inv_ptr, n_rows, attention_factor, HALF, BLOCK_HALF, CU_BLOCK, POS_MODE, SEQ_OFFSETS, N_AXES, ANGLES,
            IDX64, ACC,
        )  # fmt: skip
        tl.debug_barrier()
        # Masked lanes' angles are NaN (padding channels, tokens past the end): zero, so the row sums below
        # (the mean, the weight gradient) stay finite.
        valid = tok_mask[:, None] & (tl.arange(0, BLOCK_HALF)[None, :] < HALF)
        cos = tl.where(valid, cos, 0.0)
        sin = tl.where(valid, sin, 0.0)
        c3 = cos[:, None, :]
        s3 = sin[:, None, :]
        # ---- the forward's statistics, and dz = R(-theta) g on the rotary pairs
        if INTERLEAVED:
            xa = x.to(ACC)
            ss = tl.sum(xa * xa, axis=2)
            ge, go = tl.split(tl.reshape(g.to(ACC), [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
            dze = ge * c3 + go * s3
            dzo = go * c3 - ge * s3
            dz = tl.reshape(tl.join(dze, dzo), [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF])
        else:
            a1 = x1.to(ACC)
            a2 = x2.to(ACC)
            ss = tl.sum(a1 * a1, axis=2) + tl.sum(a2 * a2, axis=2)
            b1 = g1.to(ACC)
            b2 = g2.to(ACC)
            dz1 = b1 * c3 + b2 * s3
            dz2 = b2 * c3 - b1 * s3
        if TAIL > 0:
            at = tail.to(ACC)
            ss += tl.sum(at * at, axis=2)
            dzt = gt.to(ACC)
        if NORM_HEADS:
            n = n_heads * D
            ss = tl.sum(ss, axis=1)[:, None]
        else:
            n = D
        rstd = (1.0 / tl.sqrt(ss / n + eps))[:, :, None]
        rstd = tl.where(row_mask, rstd, 0.0)  # masked rows (eps may be 0): x_hat 0, never NaN
        # ---- gh = dz * (offset + w); dot = sum(gh * x_hat) over the statistics' span
        if INTERLEAVED:
            xh = xa * rstd
            gh = dz
            if HAS_QW or HAS_KW:
                gh = dz * tl.where(has_w, w.to(ACC) + weight_offset, 1.0)
            dot = tl.sum(gh * xh, axis=2)
        else:
            xh1 = a1 * rstd
            xh2 = a2 * rstd
            gh1 = dz1
            gh2 = dz2
            if HAS_QW or HAS_KW:
                gh1 = dz1 * tl.where(has_w, w1.to(ACC) + weight_offset, 1.0)
                gh2 = dz2 * tl.where(has_w, w2.to(ACC) + weight_offset, 1.0)
            dot = tl.sum(gh1 * xh1, axis=2) + tl.sum(gh2 * xh2, axis=2)
        if TAIL > 0:
            xht = at * rstd
            ght = dzt
            if HAS_QW or HAS_KW:
                ght = dzt * tl.where(has_w, wt.to(ACC) + weight_offset, 1.0)
            dot += tl.sum(ght * xht, axis=2)
        if NORM_HEADS:
            dot = tl.sum(dot, axis=1)[:, None]
        mean = (dot / n)[:, :, None]
        sob = tl.where(is_q, stride_dq_b, stride_dk_b)
        sos = tl.where(is_q, stride_dq_s, stride_dk_s)
        soh = tl.where(is_q, stride_dq_h, stride_dk_h)
        sod = tl.where(is_q, stride_dq_d, stride_dk_d)
        o_row = b * sob + s[:, None, None] * sos + h[None, :, None] * soh
        ety = o_ptr.dtype.element_ty
        # weight-gradient rows: [BLOCK_H, C] per head (norm "heads": weight index h*D + c), else summed over heads
        if NORM_HEADS:
            wi = h[:, None] * D
            wv = head_mask[:, None] & need_w
        else:
            wi = tl.zeros([1, 1], dtype=h.dtype)
            wv = tl.full([1, 1], 1, tl.int1) & need_w
        if INTERLEAVED:
            tl.store(o_ptr + o_row + ch * sod, (rstd * (gh - xh * mean)).to(ety), mask=m)
            if NEED_QW or NEED_KW:
                cw = tl.arange(0, 2 * BLOCK_HALF)[None, :]
                pw = tl.sum(dz * xh, axis=0)  # [BLOCK_H, channels]
                if not NORM_HEADS:
                    pw = tl.sum(pw, axis=0)[None, :]
                tl.store(dw_ptr + dw_row + wi + cw, pw, mask=wv & (cw < 2 * HALF))
        else:
            tl.store(o_ptr + o_row + ch * sod, (rstd * (gh1 - xh1 * mean)).to(ety), mask=m)
            tl.store(o_ptr + o_row + (HALF + ch) * sod, (rstd * (gh2 - xh2 * mean)).to(ety), mask=m)
            if NEED_QW or NEED_KW:
                cw = tl.arange(0, BLOCK_HALF)[None, :]
                pw1 = tl.sum(dz1 * xh1, axis=0)
                pw2 = tl.sum(dz2 * xh2, axis=0)
                if not NORM_HEADS:
                    pw1 = tl.sum(pw1, axis=0)[None, :]
                    pw2 = tl.sum(pw2, axis=0)[None, :]
                tl.store(dw_ptr + dw_row + wi + cw, pw1, mask=wv & (cw < HALF))
                tl.store(dw_ptr + dw_row + wi + HALF + cw, pw2, mask=wv & (cw < HALF))
        if TAIL > 0:
            tl.store(o_ptr + o_row + (2 * HALF + ct) * sod, (rstd * (ght - xht * mean)).to(ety), mask=mt)
            if NEED_QW or NEED_KW:
                cwt = tl.arange(0, BLOCK_TAIL)[None, :]
                pwt = tl.sum(dzt * xht, axis=0)
                if not NORM_HEADS:
                    pwt = tl.sum(pwt, axis=0)[None, :]
                tl.store(dw_ptr + dw_row + wi + 2 * HALF + cwt, pwt, mask=wv & (cwt < TAIL))


QKNORM_TILE = 8192  # elements per program (a program's whole head rows are in registers)
QKNORM_PER_THREAD = 32  # elements per thread: x, its weight and the fp32 math stay under 128 registers


def qk_norm_rope_blocks(D: int, half: int, heads_q: int, heads_k: int, seqlen: int, norm: int, interleaved: bool):
    """``(BLOCK_HALF, BLOCK_TAIL, BLOCK_H, BLOCK_T, num_warps)``. A program holds whole head rows (the
    statistics need every channel): rotary pairs padded to a power of two plus the tail. ``"heads"`` takes
    every head of a token (``BLOCK_H`` covers the larger head count), ``"head"`` up to the smaller count
    (q and k programs alike) within ``QKNORM_TILE`` elements; ``BLOCK_T`` fills the tile (at most 16 tokens
    and the sequence length); ``QKNORM_PER_THREAD`` elements per thread set the warps (1 to 16)."""
    block_half = next_pow2(half)
    tail = D - 2 * half
    block_tail = next_pow2(tail) if tail else 1
    width = 2 * block_half + (block_tail if tail else 0)
    if norm == HEADS:
        block_h = next_pow2(max(heads_q, heads_k))
    else:
        heads = min(heads_q, heads_k) if heads_k > 0 else heads_q
        block_h = min(next_pow2(heads), prev_pow2(max(1, QKNORM_TILE // width)))
    block_t = min(16, prev_pow2(max(1, QKNORM_TILE // (block_h * width))), next_pow2(seqlen))
    tile = block_t * block_h * width
    num_warps = prev_pow2(max(1, min(16, tile // (32 * QKNORM_PER_THREAD))))
    return block_half, block_tail, block_h, block_t, num_warps


def _weight_args(q, k, q_weight, k_weight):
    """``(wq, wk, HAS_QW, HAS_KW)``: unit-stride weights, and dummies where absent (masked, never read)."""
    qw = q_weight if q_weight is None or q_weight.stride(0) == 1 else q_weight.contiguous()
    kw = k_weight if k_weight is None or k_weight.stride(0) == 1 else k_weight.contiguous()
    has_qw, has_kw = qw is not None, kw is not None and k is not None
    wq = qw if has_qw else (kw if has_kw else q)
    return wq, (kw if has_kw else wq), has_qw, has_kw


# The cache stage's arguments when it is off (QK-norm + RoPE alone): never read by any program.
def _NO_CACHE_PTRS(q):
    return (q,) * 8  # v, k cache, v cache, q_fp8, slots, k/v/q scales


_NO_CACHE_SCALARS = (0, 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # n_slots, block_size, scales and reciprocals
_NO_CACHE_STRIDES = (0,) * 19  # v (4), k cache (3), v cache (3), q_fp8 (4), slots (2), scales (3)
NO_CACHE = dict(CACHE=0, SLOT64=False, K_FMAX=0.0, KS_MODE=0, HAS_V=False, DV=1, BLOCK_DV=1, BLOCK_HV=1, VS_MODE=0,
                Q_FMAX=0.0, QS_MODE=0)


def qk_norm_rope_triton(q, k, q_out, k_out, q_weight, k_weight, eps, norm, weight_offset, cos, sin, inv_freq,
                        positions, offsets, offset, cu_seqlens, axis_map, attention_factor, interleaved, conjugate,
                        exact) -> None:  # fmt: skip
    """Launch for 4-D ``q``/``k`` ``[B, S, H, D]`` (packed inputs arrive as ``B = 1``)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2] if k is not None else 0
    if B * S == 0 or Hq + Hk == 0:
        return
    half = (cos if inv_freq is None else inv_freq).shape[-1]
    angles, n_rows, inv_freq, tab, (mode, pos, spb, sps, off, soff, offset, n_seqs, cu_block, seq_off, spos_a, saxis,
                                    n_axes) = angle_launch_args(cos, sin, inv_freq, positions, offsets, offset,
                                                                cu_seqlens, axis_map, exact)  # fmt: skip
    kk = k if k is not None else q
    ko = k_out if k_out is not None else q_out
    wq, wk, has_qw, has_kw = _weight_args(q, k, q_weight, k_weight)
    inplace = q_out is q and (k is None or k_out is k)
    block_half, block_tail, block_h, block_t, num_warps = qk_norm_rope_blocks(D, half, Hq, Hk, S, norm, interleaved)
    tables = (cos, sin) if angles == 0 else ()
    idx64 = max(max_element_offset(t) for t in (q, kk, q_out, ko, *tables)) > I32_MAX
    n_s_blocks = cdiv(S, block_t)
    grid = (B * n_s_blocks, cdiv(Hq, block_h) + cdiv(Hk, block_h))
    with device_guard(q):
        _prologue_kernel[grid](
            q, kk, q_out, ko, wq, wk, tab[0], tab[1], inv_freq, pos, off, axis_map, *_NO_CACHE_PTRS(q),
            S, n_s_blocks, Hq, Hk, n_rows, offset, n_seqs, float(attention_factor), float(eps), float(weight_offset),
            *_NO_CACHE_SCALARS, *q.stride(), *kk.stride(), *q_out.stride(), *ko.stride(), *tab[2:],
            spos_a, spb, sps, soff, saxis, *_NO_CACHE_STRIDES,
            D=D, HALF=half, BLOCK_HALF=block_half, TAIL=D - 2 * half, BLOCK_TAIL=block_tail, BLOCK_T=block_t,
            BLOCK_H=block_h, POS_MODE=mode, SEQ_OFFSETS=seq_off, CU_BLOCK=cu_block, N_AXES=n_axes, ANGLES=angles,
            INTERLEAVED=interleaved, NORM=True, NORM_HEADS=norm == HEADS, HAS_QW=has_qw, HAS_KW=has_kw,
            INPLACE=inplace, IDX64=idx64, ACC=tl.float64 if q.dtype.itemsize == 8 else tl.float32, **NO_CACHE,
            num_warps=num_warps,
        )  # fmt: skip


def qk_norm_rope_backward_triton(grad_q, grad_k, q, k, q_weight, k_weight, eps, norm, weight_offset, need_qw,
                                 need_kw, dq, dk, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                 attention_factor, interleaved, conjugate, exact):  # fmt: skip
    """Backward launch for 4-D tensors: writes dq (dk, any strides); returns the weights' gradients (fp32,
    fp64 for fp64 inputs), each a fixed-order sum of per-program rows (None where not asked)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2] if k is not None else 0
    half = (cos if inv_freq is None else inv_freq).shape[-1]
    block_half, block_tail, block_h, block_t, num_warps = qk_norm_rope_blocks(D, half, Hq, Hk, S, norm, interleaved)
    n_s_blocks = cdiv(S, block_t)
    nbq, nbk = cdiv(Hq, block_h), cdiv(Hk, block_h)
    width = D if norm != HEADS else None
    dev = q.device
    need_qw = bool(need_qw and q_weight is not None)
    need_kw = bool(need_kw and k_weight is not None and k is not None)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dwq = torch.zeros(B * n_s_blocks * nbq, width or Hq * D, device=dev, dtype=acc) if need_qw else None
    dwk = torch.zeros(B * n_s_blocks * max(nbk, 1), width or Hk * D, device=dev, dtype=acc) if need_kw else None
    if B * S == 0 or Hq + Hk == 0:
        return (dwq.sum(0) if need_qw else None), (dwk.sum(0) if need_kw else None)
    angles, n_rows, inv_freq, tab, (mode, pos, spb, sps, off, soff, offset, n_seqs, cu_block, seq_off, spos_a, saxis,
                                    n_axes) = angle_launch_args(cos, sin, inv_freq, positions, offsets, offset,
                                                                cu_seqlens, axis_map, exact)  # fmt: skip
    kk = k if k is not None else q
    gk = grad_k if k is not None else grad_q
    dkk = dk if k is not None else dq
    wq, wk, has_qw, has_kw = _weight_args(q, k, q_weight, k_weight)
    bq = dwq if need_qw else (dwk if need_kw else dq)  # dummies where not asked: never written
    bk = dwk if need_kw else bq
    tables = (cos, sin) if angles == 0 else ()
    idx64 = max(max_element_offset(t) for t in (q, kk, grad_q, gk, *tables)) > I32_MAX
    grid = (B * n_s_blocks, nbq + nbk)
    with device_guard(q):
        _qk_norm_rope_bwd_kernel[grid](
            q, kk, grad_q, gk, dq, dkk, wq, wk, bq, bk, tab[0], tab[1], inv_freq, pos, off, axis_map,
            S, n_s_blocks, Hq, Hk, n_rows, offset, n_seqs, float(attention_factor), float(eps), float(weight_offset),
            *q.stride(), *kk.stride(), *grad_q.stride(), *gk.stride(), *dq.stride(), *dkk.stride(), *tab[2:],
            spos_a, spb, sps, soff, saxis, bq.stride(0) if bq.dim() == 2 else 0, bk.stride(0) if bk.dim() == 2 else 0,
            D=D, HALF=half, BLOCK_HALF=block_half, TAIL=D - 2 * half, BLOCK_TAIL=block_tail, BLOCK_T=block_t,
            BLOCK_H=block_h, POS_MODE=mode, SEQ_OFFSETS=seq_off, CU_BLOCK=cu_block, N_AXES=n_axes, ANGLES=angles,
            INTERLEAVED=interleaved, NORM_HEADS=norm == HEADS, HAS_QW=has_qw, HAS_KW=has_kw, NEED_QW=need_qw,
            NEED_KW=need_kw, IDX64=idx64, ACC=tl.float64 if q.dtype.itemsize == 8 else tl.float32,
            num_warps=num_warps,
        )  # fmt: skip
    return (dwq.sum(0) if need_qw else None), (dwk.sum(0) if need_kw else None)
