"""Sinusoidal Triton kernel and its launcher: the table (no x) and the fused ``x * x_scale + PE``.

One program writes ``BLOCK_T`` tokens of one sequence x ``BLOCK_C`` frequencies (``2 * BLOCK_C``
channels: each angle's sin and cos are each used once), positions from
:func:`..positions.token_positions_tl`; x and out take any strides.
"""

from __future__ import annotations

from ..checks import I32_MAX, cdiv, device_guard, max_element_offset, next_pow2, prev_pow2
from ..positions import launch_args, token_positions_tl
from ..registry import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sinusoidal_kernel(
        x_ptr, out_ptr, pos_ptr, off_ptr, inv_freq_ptr,
        seqlen, n_s_blocks, offset, x_scale, scale,
        stride_x_b, stride_x_s, stride_x_d, stride_o_b, stride_o_s, stride_o_d,
        stride_pos_b, stride_pos_s, stride_off,
        HALF: tl.constexpr, PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        POS_MODE: tl.constexpr, SEQ_OFFSETS: tl.constexpr, HAS_X: tl.constexpr, INTERLEAVED: tl.constexpr,
        COS_FIRST: tl.constexpr, IDX64: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """PE (or x * x_scale + PE) for the program's tokens and frequencies. Angles in ACC: fp32, positions
        rounded to fp32 first as every published implementation does (fp64 for fp64 outputs)."""
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = pid // n_s_blocks
        s = (pid - b * n_s_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        if IDX64:  # the launcher found an element offset (or a position) that may not fit in 32 bits
            b = b.to(tl.int64)
            s = s.to(tl.int64)
        tok_mask = s < seqlen
        # ---- loads: the position, the frequencies and x (none waits on another)
        pos = token_positions_tl(
            b, s, tok_mask, pos_ptr, stride_pos_b, stride_pos_s, off_ptr, stride_off, offset, 0, 16, POS_MODE,
            SEQ_OFFSETS,
        )  # fmt: skip
        f = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inv = tl.load(inv_freq_ptr + f, mask=f < HALF, other=0.0)
        x_tok = (b * stride_x_b + s * stride_x_s)[:, None]
        o_tok = (b * stride_o_b + s * stride_o_s)[:, None]
        if INTERLEAVED:
            ch = pid_c * (2 * BLOCK_C) + tl.arange(0, 2 * BLOCK_C)[None, :]
            m = tok_mask[:, None] & (ch < 2 * HALF)
            if HAS_X:
                xv = tl.load(x_ptr + x_tok + ch * stride_x_d, mask=m, other=0.0)
        else:
            ch = f[None, :]
            m = tok_mask[:, None] & (ch < HALF)
        if PAD:  # odd dim: the last column carries no encoding (written by the first frequency block)
            last = 2 * HALF
            m_last = (s < tl.where(pid_c == 0, seqlen, 0))[:, None]
            if HAS_X:
                x_last = tl.load(x_ptr + x_tok + last * stride_x_d, mask=m_last, other=0.0)
        # ---- every load is issued (a fence keeps it so), then the math: sin/cos hide x's latency. The halves
        # layout loads x after the math instead (a second round trip, hidden behind the sin/cos of other
        # warps): each thread needs 8 angles for its 16-byte vectors there, and with x live across libdevice's
        # sin/cos Triton 3.6's ptxas spills (tests/test_static_sass.py).
        tl.debug_barrier()
        angle = (pos.to(ACC)[:, None] * inv.to(ACC)[None, :]) * scale
        if COS_FIRST:
            first = tl.cos(angle)
            second = tl.sin(angle)
        else:
            first = tl.sin(angle)
            second = tl.cos(angle)
        if HAS_X and not INTERLEAVED:
            x1 = tl.load(x_ptr + x_tok + ch * stride_x_d, mask=m, other=0.0)
            x2 = tl.load(x_ptr + x_tok + (HALF + ch) * stride_x_d, mask=m, other=0.0)
        if INTERLEAVED:
            pe = tl.reshape(tl.join(first, second), [BLOCK_T, 2 * BLOCK_C])
            if HAS_X:
                pe = xv.to(ACC) * x_scale + pe
            tl.store(out_ptr + o_tok + ch * stride_o_d, pe.to(out_ptr.dtype.element_ty), mask=m)
        else:
            pe1 = first
            pe2 = second
            if HAS_X:
                pe1 = x1.to(ACC) * x_scale + pe1
                pe2 = x2.to(ACC) * x_scale + pe2
            tl.store(out_ptr + o_tok + ch * stride_o_d, pe1.to(out_ptr.dtype.element_ty), mask=m)
            tl.store(out_ptr + o_tok + (HALF + ch) * stride_o_d, pe2.to(out_ptr.dtype.element_ty), mask=m)
        if PAD:
            val = tl.zeros([BLOCK_T, 1], dtype=ACC)
            if HAS_X:
                val = x_last.to(ACC) * x_scale
            tl.store(out_ptr + o_tok + last * stride_o_d, val.to(out_ptr.dtype.element_ty), mask=m_last)


_ANGLES_PER_PROGRAM = 512


def sinusoidal_blocks(half: int, seqlen: int, interleaved: bool = True):
    """Tile heuristic: about 512 angles per program, up to 64 frequencies wide, the rest in tokens (at most
    the sequence length). Each thread's outputs fill 16-byte vectors: 4 warps interleaved (4 sin/cos pairs
    per thread), 2 for halves (8 angles per thread); more per thread spills on Triton 3.6 (tests/static/)."""
    block_c = max(1, min(next_pow2(half), 64))
    block_t = max(1, min(_ANGLES_PER_PROGRAM // block_c, next_pow2(seqlen), 64))
    num_warps = prev_pow2(min(4 if interleaved else 2, max(1, block_t * block_c // (128 if interleaved else 256))))
    return block_c, block_t, num_warps


def sinusoidal_triton(x, out, positions, offsets, offset, x_scale, inv_freq, scale, interleaved, cos_first) -> None:
    """Launch for ``out`` ``[B, S, D]`` (any strides) and ``x`` None (the table) or ``[B, S, D]`` (the add;
    ``x`` may be ``out``). ``inv_freq`` ``[D // 2]`` in the math dtype (fp32, fp64 for fp64 outputs)."""
    B, S, D = out.shape
    if B * S == 0:
        return
    half = D // 2
    mode, pos, spb, sps, off, soff, offset, _, _, seq_off = launch_args(positions, offsets, offset, None)
    xx = x if x is not None else out  # a dummy without x: no program reads it
    block_c, block_t, num_warps = sinusoidal_blocks(half, S, interleaved)
    n_s_blocks = cdiv(S, block_t)
    idx64 = max(max_element_offset(xx), max_element_offset(out), abs(offset) + S) > I32_MAX
    grid = (B * n_s_blocks, max(1, cdiv(half, block_c)))
    with device_guard(out):
        _sinusoidal_kernel[grid](
            xx, out, pos, off, inv_freq,
            S, n_s_blocks, offset, float(x_scale), float(scale),
            *xx.stride(), *out.stride(), spb, sps, soff,
            HALF=half, PAD=D % 2 == 1, BLOCK_T=block_t, BLOCK_C=block_c, POS_MODE=mode, SEQ_OFFSETS=seq_off,
            HAS_X=x is not None, INTERLEAVED=interleaved, COS_FIRST=cos_first, IDX64=idx64,
            ACC=tl.float64 if out.dtype.itemsize == 8 else tl.float32, num_warps=num_warps,
        )  # fmt: skip
