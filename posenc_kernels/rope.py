"""Rotary position embedding (RoPE).

Read top-down: Triton kernels -> pure-torch implementation -> validation and launchers -> torch.library
ops (fake + autograd) -> public functions.

Layout conventions (the public contract):

* ``q`` is ``[B, S, Hq, D]`` and ``k`` is ``[B, S, Hk, D]`` with any strides as long as ``stride(-1) == 1``
  (an HF ``[B, H, S, D]`` tensor passed as ``.transpose(1, 2)`` works without a copy).
* ``cos`` / ``sin`` are ``[P, R/2]`` tables; ``R = 2 * cos.shape[-1] <= D`` channels rotate, the rest are
  untouched (partial rotary).
* The table row of token ``(b, s)`` is ``positions[b, s]`` (or ``positions[s]``) when positions are given,
  else ``offsets + s`` with ``offsets`` an int or a ``[B]`` tensor.
* ``interleaved=False`` pairs channel ``d`` with ``d + R/2`` (GPT-NeoX / HF); ``True`` pairs ``2i`` with
  ``2i + 1`` (GPT-J).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INT_DTYPES,
    check_last_stride,
    check_position_args,
    check_position_values,
    check_tensor,
    check_disjoint,
    check_inplace_autograd,
    check_writable,
    device_guard,
    next_pow2,
    prev_pow2,
    resolve_backend,
    split_offsets,
    tl_acc_dtype,
    token_positions,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rope_cos_sin", "apply_rope_", "apply_rope"]

# Position modes shared by the kernels: how the table row of a token is found.
POS_OFFSET = 0  # row = offset + s (int offset)
POS_OFFSETS = 1  # row = offsets[b] + s
POS_POSITIONS = 2  # row = positions[b, s]


# ==============================================================================================
# Triton kernels
# ==============================================================================================
if HAS_TRITON:

    @triton.jit
    def _rope_rotate_heads(
        x_ptr,
        o_ptr,
        h0,
        n_heads,
        x_tok,  # [BLOCK_T] int64 element offset of each token in x
        o_tok,  # [BLOCK_T] int64 element offset of each token in the output
        tok_mask,
        stride_xh,
        stride_oh,
        cos,  # [BLOCK_T, BLOCK_HALF] in ACC
        sin,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        TAIL: tl.constexpr,
        BLOCK_TAIL: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        COPY_TAIL: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Rotate heads [h0, h0 + BLOCK_H) of BLOCK_T tokens; cos/sin rows are shared by all heads."""
        h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
        x_row = x_tok[:, None, None] + h[None, :, None] * stride_xh  # [BLOCK_T, BLOCK_H, 1]
        o_row = o_tok[:, None, None] + h[None, :, None] * stride_oh
        row_mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None]
        c3 = cos[:, None, :]
        s3 = sin[:, None, :]
        if INTERLEAVED:
            # One contiguous load of the 2*HALF rotary channels, split into (even, odd) in registers.
            ch = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
            m = row_mask & (ch < 2 * HALF)
            x = tl.load(x_ptr + x_row + ch, mask=m, other=0.0).to(ACC)
            x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
            o_even = x_even * c3 - x_odd * s3
            o_odd = x_odd * c3 + x_even * s3
            out = tl.reshape(tl.join(o_even, o_odd), [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF])
            tl.store(o_ptr + o_row + ch, out.to(o_ptr.dtype.element_ty), mask=m)
        else:
            ch = tl.arange(0, BLOCK_HALF)[None, None, :]
            m = row_mask & (ch < HALF)
            x1 = tl.load(x_ptr + x_row + ch, mask=m, other=0.0).to(ACC)
            x2 = tl.load(x_ptr + x_row + HALF + ch, mask=m, other=0.0).to(ACC)
            o1 = x1 * c3 - x2 * s3
            o2 = x2 * c3 + x1 * s3
            tl.store(o_ptr + o_row + ch, o1.to(o_ptr.dtype.element_ty), mask=m)
            tl.store(o_ptr + o_row + HALF + ch, o2.to(o_ptr.dtype.element_ty), mask=m)
        if COPY_TAIL:
            # Out-of-place with partial rotary: channels [R, D) pass through unchanged.
            ct = tl.arange(0, BLOCK_TAIL)[None, None, :]
            mt = row_mask & (ct < TAIL)
            tail = tl.load(x_ptr + x_row + 2 * HALF + ct, mask=mt, other=0.0)
            tl.store(o_ptr + o_row + 2 * HALF + ct, tail, mask=mt)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        qo_ptr,
        ko_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        n_tokens,
        seqlen,
        n_heads_q,
        n_heads_k,
        n_rows,
        offset,
        stride_q_b,
        stride_q_s,
        stride_q_h,
        stride_k_b,
        stride_k_s,
        stride_k_h,
        stride_qo_b,
        stride_qo_s,
        stride_qo_h,
        stride_ko_b,
        stride_ko_s,
        stride_ko_h,
        stride_cos_p,
        stride_sin_p,
        stride_pos_b,
        stride_pos_s,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        TAIL: tl.constexpr,
        BLOCK_TAIL: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        POS_MODE: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        CONJUGATE: tl.constexpr,
        COPY_TAIL: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (token blocks, q head blocks + k head blocks). One launch rotates q and k."""
        pid_t = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        tok_mask = t < n_tokens
        b = t // seqlen
        s = t - b * seqlen
        if POS_MODE == 0:
            pos = s + offset
        elif POS_MODE == 1:
            pos = tl.load(pos_ptr + b * stride_pos_b, mask=tok_mask, other=0).to(tl.int64) + s
        else:
            pos = tl.load(pos_ptr + b * stride_pos_b + s * stride_pos_s, mask=tok_mask, other=0).to(tl.int64)
        # Rows outside the table read as NaN (only reachable when host-side checks are skipped, i.e. under
        # CUDA graph capture): a loud result instead of an out-of-bounds read.
        row_ok = tok_mask & (pos >= 0) & (pos < n_rows)
        c = tl.arange(0, BLOCK_HALF)[None, :]
        cm = row_ok[:, None] & (c < HALF)
        cos = tl.load(cos_ptr + pos[:, None] * stride_cos_p + c, mask=cm, other=float("nan")).to(ACC)
        sin = tl.load(sin_ptr + pos[:, None] * stride_sin_p + c, mask=cm, other=float("nan")).to(ACC)
        if CONJUGATE:
            sin = -sin
        n_q_blocks = tl.cdiv(n_heads_q, BLOCK_H)
        if pid_h < n_q_blocks:
            _rope_rotate_heads(
                q_ptr, qo_ptr, pid_h * BLOCK_H, n_heads_q,
                b * stride_q_b + s * stride_q_s, b * stride_qo_b + s * stride_qo_s, tok_mask,
                stride_q_h, stride_qo_h, cos, sin,
                HALF, BLOCK_HALF, TAIL, BLOCK_TAIL, BLOCK_T, BLOCK_H, INTERLEAVED, COPY_TAIL, ACC,
            )  # fmt: skip
        else:
            _rope_rotate_heads(
                k_ptr, ko_ptr, (pid_h - n_q_blocks) * BLOCK_H, n_heads_k,
                b * stride_k_b + s * stride_k_s, b * stride_ko_b + s * stride_ko_s, tok_mask,
                stride_k_h, stride_ko_h, cos, sin,
                HALF, BLOCK_HALF, TAIL, BLOCK_TAIL, BLOCK_T, BLOCK_H, INTERLEAVED, COPY_TAIL, ACC,
            )  # fmt: skip

    @triton.jit
    def _rope_cos_sin_kernel(
        pos_ptr,
        inv_freq_ptr,
        cos_ptr,
        sin_ptr,
        n_pos,
        half,
        attention_factor,
        BLOCK_P: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
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


# ==============================================================================================
# Pure-torch implementation (CPU default until native kernels land; any device)
# ==============================================================================================
_TORCH_CHUNK_ELEMS = 1 << 21  # bounds the fp32 temporaries of the torch path (8 MiB each)


def _rotate_torch(x_in, x_out, cos, sin, rows, interleaved, conjugate):
    """Rotate ``x_in`` into ``x_out`` (which may be ``x_in``) chunk by chunk along S, math in fp32/fp64.

    Temporaries are bounded by the chunk size, never proportional to the input."""
    B, S, H, D = x_in.shape
    half = cos.shape[-1]
    R = 2 * half
    acc = torch.float64 if x_in.dtype == torch.float64 else torch.float32
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, B * H * R))
    shared_rows = rows.stride(0) == 0  # same rows for every sequence: gather the tables once
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[:1, s0:s1] if shared_rows else rows[:, s0:s1]
        c = cos[r].to(acc).unsqueeze(2)  # [B or 1, s, 1, half]
        sn = sin[r].to(acc).unsqueeze(2)
        if conjugate:
            sn = -sn
        xi = x_in[:, s0:s1, :, :R]
        xo = x_out[:, s0:s1, :, :R]
        if interleaved:
            pairs = xi.unflatten(-1, (half, 2))
            x1, x2 = pairs[..., 0].to(acc), pairs[..., 1].to(acc)
        else:
            x1, x2 = xi[..., :half].to(acc), xi[..., half:].to(acc)
        # Both outputs are computed before either is written back (for fp32 x1/x2 alias the input).
        o1 = torch.addcmul(x1 * c, x2, sn, value=-1)
        o2 = torch.addcmul(x2 * c, x1, sn)
        if interleaved:
            xo.unflatten(-1, (half, 2)).copy_(torch.stack((o1, o2), dim=-1))
        else:
            xo[..., :half].copy_(o1)
            xo[..., half:].copy_(o2)
        if x_out is not x_in and R < D:
            x_out[:, s0:s1, :, R:].copy_(x_in[:, s0:s1, :, R:])


def _rope_torch(q, k, q_out, k_out, cos, sin, positions, offsets, offset, interleaved, conjugate):
    B, S = q.shape[0], q.shape[1]
    rows = token_positions(positions, offsets, offset, B, S, q.device)
    _rotate_torch(q, q_out, cos, sin, rows, interleaved, conjugate)
    if k is not None:
        _rotate_torch(k, k_out, cos, sin, rows, interleaved, conjugate)


# ==============================================================================================
# Validation and launchers
# ==============================================================================================


def _check_rope(q, k, cos, sin, positions, offsets, offset, *, inplace: bool, values: bool, rows: bool = True) -> None:
    """Every check runs before anything is written. ``values`` adds the checks that need real tensors
    (aliasing, overlap and, with ``rows``, the position values - a host sync on CUDA): the op
    implementations run them, fakes and traced code cannot."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    dev = q.device
    B, S, Hq, D = q.shape
    check_last_stride("q", q)
    if k is not None:
        check_tensor("k", k, ndim=4, device=dev)
        if k.dtype != q.dtype:
            raise TypeError(f"k must have the same dtype as q ({q.dtype}), got {k.dtype}")
        if (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
            raise ValueError(f"k must be [B, S, Hk, D] = [{B}, {S}, Hk, {D}] to match q, got {tuple(k.shape)}")
        check_last_stride("k", k)
        if inplace and k is q:
            raise ValueError("k must not overlap q: shared elements would be rotated twice")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    half = cos.shape[1]
    if half == 0:
        raise ValueError("cos must have R/2 >= 1 columns (R = rotary dim), got 0")
    if 2 * half > D:
        raise ValueError(f"rotary dim R = 2 * cos.shape[-1] = {2 * half} exceeds head_dim D = {D}")
    check_position_args(positions, offsets, offset, batch=B, seqlen=S, device=dev)
    if inplace and values:  # memory-layout checks need real tensors (fakes have no storage)
        check_writable("q", q)
        if k is not None:
            check_writable("k", k)
            check_disjoint("q", q, "k", k)
    if values and rows and B * S > 0:  # zero tokens is a no-op whatever the table
        check_position_values(positions, offsets, offset, seqlen=S, num_rows=cos.shape[0], device=dev)


def _rope_blocks(half: int, tail: int, heads_q: int, heads_k: int, n_tokens: int):
    """Block-size heuristic (documented in the README).

    A program handles BLOCK_T tokens x BLOCK_H heads; the cos/sin rows it loads serve all of them. The
    channels a head touches are ``width`` = the rotary ones (padded to a power of two) plus, when copying
    out of place with partial rotary, the pass-through tail. BLOCK_H is the power of two covering the
    smaller head count, so q and k programs are alike (Llama-3-8B: q in 4 blocks of 8 heads, k in one),
    capped so a tile stays near 4096 elements; BLOCK_T fills the tile (at most 16 tokens and never past
    the token count). Warps grow with the tile: about 32 elements per thread."""
    block_half = next_pow2(half)
    block_tail = next_pow2(tail) if tail else 0
    width = 2 * block_half + block_tail
    heads = min(heads_q, heads_k) if heads_k > 0 else heads_q
    block_h = min(next_pow2(heads), prev_pow2(4096 // width))
    block_t = min(16, prev_pow2(4096 // (block_h * width)), next_pow2(n_tokens))
    tile = block_t * block_h * width
    num_warps = prev_pow2(min(8, tile // 1024))
    return block_half, block_tail, block_h, block_t, num_warps


def _rope_triton(q, k, q_out, k_out, cos, sin, positions, offsets, offset, interleaved, conjugate):
    B, S, Hq, D = q.shape
    Hk = k.shape[2] if k is not None else 0
    n_tokens = B * S
    half = cos.shape[1]
    if n_tokens == 0 or Hq + Hk == 0:
        return
    # Tables are read-only and small: a non-unit column stride is fixed with a copy of the table.
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if positions is not None:
        pos_mode, pos = POS_POSITIONS, positions
        spos_b = positions.stride(0) if positions.dim() == 2 else 0
        spos_s = positions.stride(-1)
    elif offsets is not None:
        pos_mode, pos, spos_b, spos_s = POS_OFFSETS, offsets, offsets.stride(0), 0
    else:
        pos_mode, pos, spos_b, spos_s = POS_OFFSET, None, 0, 0
    kk = k if k is not None else q  # dummies when k is absent: no program touches them
    ko = k_out if k_out is not None else q_out
    copy_tail = q_out is not q and 2 * half < D
    tail = D - 2 * half
    block_half, block_tail, block_h, block_t, num_warps = _rope_blocks(half, tail if copy_tail else 0, Hq, Hk, n_tokens)
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(Hq, block_h) + triton.cdiv(Hk, block_h))
    with device_guard(q):
        _rope_kernel[grid](
            q, kk, q_out, ko, cos, sin, pos,
            n_tokens, S, Hq, Hk, cos.shape[0], offset,
            q.stride(0), q.stride(1), q.stride(2),
            kk.stride(0), kk.stride(1), kk.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            ko.stride(0), ko.stride(1), ko.stride(2),
            cos.stride(0), sin.stride(0), spos_b, spos_s,
            HALF=half, BLOCK_HALF=block_half, TAIL=tail, BLOCK_TAIL=max(block_tail, 1),
            BLOCK_T=block_t, BLOCK_H=block_h, POS_MODE=pos_mode, INTERLEAVED=interleaved,
            CONJUGATE=conjugate, COPY_TAIL=copy_tail, ACC=tl_acc_dtype(q.dtype), num_warps=num_warps,
        )  # fmt: skip


def _rope_dispatch(q, k, q_out, k_out, cos, sin, positions, offsets, offset, interleaved, conjugate):
    if q.shape[0] * q.shape[1] == 0:
        return  # zero tokens: nothing to do
    impl = _rope_triton if resolve_backend(q.device) == "triton" else _rope_torch
    impl(q, k, q_out, k_out, cos, sin, positions, offsets, offset, interleaved, conjugate)


def _cos_sin_torch(positions, inv_freq, attention_factor, cos, sin):
    angle = positions.reshape(-1, 1).to(torch.float32) * inv_freq.to(torch.float32)[None, :]
    cos.view(-1, inv_freq.shape[0]).copy_(angle.cos() * attention_factor)
    sin.view(-1, inv_freq.shape[0]).copy_(angle.sin() * attention_factor)


def _cos_sin_triton(positions, inv_freq, attention_factor, cos, sin):
    n, half = positions.numel(), inv_freq.shape[0]
    if n == 0:
        return
    pos = positions.reshape(-1)  # positions are O(tokens), never O(tokens x channels)
    inv = inv_freq if inv_freq.stride(0) == 1 else inv_freq.contiguous()
    block_f = min(next_pow2(half), 128)
    block_p = max(1, min(2048 // block_f, next_pow2(n)))
    grid = (triton.cdiv(n, block_p), triton.cdiv(half, block_f))
    with device_guard(positions):
        _rope_cos_sin_kernel[grid](pos, inv, cos, sin, n, half, float(attention_factor), BLOCK_P=block_p, BLOCK_F=block_f)


def _check_cos_sin(positions, inv_freq, dtype):
    check_tensor("positions", positions, dtypes=INT_DTYPES + FLOAT_DTYPES)
    check_tensor("inv_freq", inv_freq, dtypes=FLOAT_DTYPES, ndim=1, device=positions.device)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")


# ==============================================================================================
# torch.library ops
# ==============================================================================================


@torch.library.custom_op("posenc::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    interleaved: bool,
    conjugate: bool,
) -> None:
    """In place: q, k <- rotate(q, k) (by -theta when ``conjugate``). One kernel launch for both."""
    _check_rope(q, k, cos, sin, positions, offsets, offset, inplace=True, values=True)
    _rope_dispatch(q, k, q, k, cos, sin, positions, offsets, offset, interleaved, conjugate)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, positions, offsets, offset, interleaved, conjugate):
    _check_rope(q, k, cos, sin, positions, offsets, offset, inplace=True, values=False)


@torch.library.custom_op("posenc::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    interleaved: bool,
    conjugate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: returns (rotated q, rotated k); with k None the second output is an empty tensor."""
    _check_rope(q, k, cos, sin, positions, offsets, offset, inplace=False, values=True)
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k) if k is not None else None
    _rope_dispatch(q, k, q_out, k_out, cos, sin, positions, offsets, offset, interleaved, conjugate)
    return q_out, (k_out if k_out is not None else q.new_empty(0))


@_rope_op.register_fake
def _(q, k, cos, sin, positions, offsets, offset, interleaved, conjugate):
    _check_rope(q, k, cos, sin, positions, offsets, offset, inplace=False, values=False)
    return torch.empty_like(q), (torch.empty_like(k) if k is not None else q.new_empty(0))


def _unit_stride(g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Upstream gradients can be expanded (stride 0) views; the kernels need stride(-1) == 1.
    return g if g is None or g.stride(-1) == 1 or g.shape[-1] <= 1 else g.contiguous()


def _rope_backward_common(ctx, grad_q, grad_k):
    cos, sin, positions, offsets = ctx.saved_tensors
    gk = _unit_stride(grad_k) if ctx.has_k else None
    gq, gk = torch.ops.posenc.rope(
        _unit_stride(grad_q), gk, cos, sin, positions, offsets, ctx.offset, ctx.interleaved, not ctx.conjugate
    )
    return gq, (gk if ctx.has_k else None)


def _rope_setup_context(ctx, inputs, output):
    q, k, cos, sin, positions, offsets, offset, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, positions, offsets)
    ctx.has_k = k is not None
    ctx.offset, ctx.interleaved, ctx.conjugate = offset, interleaved, conjugate


def _rope_backward(ctx, grad_q, grad_k):
    gq, gk = _rope_backward_common(ctx, grad_q, grad_k)
    return gq, gk, None, None, None, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


@torch.library.custom_op("posenc::rope_cos_sin", mutates_args=())
def _rope_cos_sin_op(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_cos_sin(positions, inv_freq, dtype)
    shape = tuple(positions.shape) + (inv_freq.shape[0],)
    cos = torch.empty(shape, dtype=dtype, device=positions.device)
    sin = torch.empty(shape, dtype=dtype, device=positions.device)
    if resolve_backend(positions.device) == "triton":
        _cos_sin_triton(positions, inv_freq, attention_factor, cos, sin)
    else:
        _cos_sin_torch(positions, inv_freq, attention_factor, cos, sin)
    return cos, sin


@_rope_cos_sin_op.register_fake
def _(positions, inv_freq, attention_factor, dtype):
    _check_cos_sin(positions, inv_freq, dtype)
    shape = tuple(positions.shape) + (inv_freq.shape[0],)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


# In-place autograd: the mutating op cannot carry a registered formula, so the public function wraps it
# in an autograd.Function that marks the tensor dirty (version counter, leaf and view checks exactly as
# PyTorch does for its own in-place ops); backward is the functional op rotating by -theta. Autograd lets
# a Function that modifies a view in place return one tensor only (and q/k are usually views of a
# projection), so when gradients are recorded q and k take one launch each.
class _RopeInplaceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, positions, offsets, offset, interleaved, conjugate):
        torch.ops.posenc.rope_(x, None, cos, sin, positions, offsets, offset, interleaved, conjugate)
        _rope_setup_context(ctx, (x, None, cos, sin, positions, offsets, offset, interleaved, conjugate), None)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        gx, _ = _rope_backward_common(ctx, grad, None)
        return gx, None, None, None, None, None, None, None


# ==============================================================================================
# Public functions
# ==============================================================================================


def rope_cos_sin(
    positions_or_length: Union[int, torch.Tensor],
    inv_freq: torch.Tensor,
    *,
    attention_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[..., R/2]`` for ``apply_rope_``: ``attention_factor * cos(pos * inv_freq)``.

    ``positions_or_length`` is an int ``P`` (rows ``0..P-1``) or a tensor of positions of any shape
    (int or float). Each angle is one fp32 product ``fp32(pos) * inv_freq`` (never a matmul), computed by a
    Triton kernel on CUDA.

    >>> import posenc_kernels as pk
    >>> cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(8)[0])
    >>> cos.shape, sin.dtype
    (torch.Size([16, 4]), torch.float32)
    """
    if isinstance(positions_or_length, torch.Tensor):
        positions = positions_or_length
    elif isinstance(positions_or_length, int) and not isinstance(positions_or_length, bool):
        if positions_or_length < 0:
            raise ValueError(f"positions_or_length must be >= 0, got {positions_or_length}")
        device = inv_freq.device if isinstance(inv_freq, torch.Tensor) else None
        positions = torch.arange(positions_or_length, device=device)
    else:
        raise TypeError(f"positions_or_length must be an int or a tensor, got {type(positions_or_length).__name__}")
    return torch.ops.posenc.rope_cos_sin(positions, inv_freq, float(attention_factor), dtype)


def apply_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate ``q`` ``[B, S, Hq, D]`` and ``k`` ``[B, S, Hk, D]`` in place, in one kernel launch.

    See the module docstring for layouts. Returns ``(q, k)`` (the same tensors). Differentiable w.r.t. q
    and k under PyTorch's in-place rules (a leaf that requires grad raises, as for ``x.mul_``).

    >>> import torch, posenc_kernels as pk
    >>> q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 1, 16)
    >>> cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(16)[0])
    >>> q2, k2 = pk.apply_rope_(q, k, cos, sin)
    >>> q2 is q
    True
    """
    offsets_t, offset = split_offsets(offsets)
    needs_grad = torch.is_grad_enabled() and (
        (isinstance(q, torch.Tensor) and q.requires_grad) or (isinstance(k, torch.Tensor) and k.requires_grad)
    )
    if needs_grad:
        # Everything is checked for both tensors before either is written - including the errors autograd
        # itself would raise, which a custom Function only raises after its forward ran. Traced code
        # (torch.compile) has no storage to inspect; tracing raises autograd's errors before running.
        real = not torch.compiler.is_compiling()
        # Position values are left to q's launch, which checks them before writing q (k shares them):
        # checking them here as well would be one more host sync per call on CUDA.
        _check_rope(q, k, cos, sin, positions, offsets_t, offset, inplace=True, values=real, rows=False)
        if real:
            check_inplace_autograd("q", q)
            if k is not None:
                check_inplace_autograd("k", k)
        args = (cos, sin, positions, offsets_t, offset, interleaved, False)
        q = _RopeInplaceFunction.apply(q, *args)
        if k is not None:
            k = _RopeInplaceFunction.apply(k, *args)
        return q, k
    torch.ops.posenc.rope_(q, k, cos, sin, positions, offsets_t, offset, interleaved, False)
    return q, k


def apply_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place twin of :func:`apply_rope_`: returns new rotated tensors, inputs untouched.

    >>> import torch, posenc_kernels as pk
    >>> q = torch.randn(1, 3, 2, 8)
    >>> cos, sin = pk.rope_cos_sin(3, pk.rope_frequencies(8)[0])
    >>> q_rot, _ = pk.apply_rope(q, None, cos, sin)
    >>> torch.equal(q_rot[:, 0], q[:, 0])  # position 0 is the identity rotation
    True
    """
    offsets_t, offset = split_offsets(offsets)
    q_out, k_out = torch.ops.posenc.rope(q, k, cos, sin, positions, offsets_t, offset, interleaved, False)
    return q_out, (k_out if k is not None else None)
