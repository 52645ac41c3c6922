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
* Packed (varlen) batches: ``q`` ``[T, Hq, D]`` / ``k`` ``[T, Hk, D]`` with ``cu_seqlens`` ``[N + 1]``
  (sequence ``n`` owns tokens ``cu_seqlens[n]:cu_seqlens[n+1]``; its positions restart at ``offsets[n]``
  or the int ``offsets``; tokens past ``cu_seqlens[-1]``, a padded graph bucket, take position 0), or
  with per-token ``positions`` ``[T]``.
* Angles come from the tables, or on the fly from ``inv_freq`` ``[R/2]`` (no table): by default one fp32
  product ``fp32(pos) * inv_freq`` then fp32 cos/sin (HF's numerics), scaled by ``attention_factor``;
  ``exact=True`` takes float64 ``inv_freq``, forms the angle in float64 and reduces it mod 2*pi before
  the fp32 cos/sin (within 1e-6 rad of the float64 truth up to positions 2**22 and beyond).
* Multi-axis positions (M-RoPE, axial RoPE): ``axis_map`` ``[R/2]`` says which row of ``positions``
  ``[A, B, S]`` (or ``[A, S]``) frequency ``i`` follows; see :func:`mrope_axis_map`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import NamedTuple, Optional, Union

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _get_dispatch_mode

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
    on_cuda_graph_capture,
    prev_pow2,
    resolve_backend,
    split_offsets,
    tl_acc_dtype,
    value_checks_enabled,
    token_positions,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rope_cos_sin", "apply_rope_", "apply_rope", "apply_rope_qkv_", "mrope_axis_map", "axial_positions"]

# Position modes shared by the kernels: how the table row of a token is found.
POS_OFFSET = 0  # row = offset + s (int offset)
POS_OFFSETS = 1  # row = offsets[b] + s
POS_POSITIONS = 2  # row = positions[b, s] (per frequency axis with an axis map)
POS_CU_SEQLENS = 3  # packed varlen: row = offset(s)[n] + t - cu_seqlens[n]


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
        inv_ptr,
        pos_ptr,
        off_ptr,
        axis_ptr,
        n_tokens,
        seqlen,
        n_heads_q,
        n_heads_k,
        n_rows,
        offset,
        n_seqs,
        n_search,
        n_axes,
        attention_factor,
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
        stride_pos_a,
        stride_pos_b,
        stride_pos_s,
        stride_off,
        stride_axis,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        TAIL: tl.constexpr,
        BLOCK_TAIL: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        POS_MODE: tl.constexpr,
        SEQ_OFFSETS: tl.constexpr,
        MULTI_AXIS: tl.constexpr,
        ANGLES: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        CONJUGATE: tl.constexpr,
        COPY_TAIL: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (token blocks, q head blocks + k head blocks). One launch rotates q and k.

        The cos/sin tile [BLOCK_T, BLOCK_HALF] is built once per program (table gather or on-the-fly
        angles) and serves every head of the block."""
        pid_t = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        tok_mask = t < n_tokens
        b = t // seqlen
        s = t - b * seqlen
        c = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = c < HALF
        # ---- the position of every (token, frequency): [BLOCK_T, 1], or [BLOCK_T, BLOCK_HALF] with axes
        if POS_MODE == 0:
            pos = (s + offset)[:, None]
        elif POS_MODE == 1:
            pos = (tl.load(off_ptr + b * stride_off, mask=tok_mask, other=0).to(tl.int64) + s)[:, None]
        elif POS_MODE == 2:
            tok_off = b * stride_pos_b + s * stride_pos_s
            if MULTI_AXIS:
                # Frequency i follows axis axis_map[i] (M-RoPE sections, 2-D axial RoPE). An axis outside
                # positions (reachable only with value checks off) is never read: its position is -1, which
                # the table path turns into NaN, and the on-the-fly path below too.
                ax = tl.load(axis_ptr + c * stride_axis, mask=cmask, other=0).to(tl.int64)
                ax_ok = (ax >= 0) & (ax < n_axes)
                pm = tok_mask[:, None] & cmask & ax_ok
                pos = tl.load(pos_ptr + ax * stride_pos_a + tok_off[:, None], mask=pm, other=0).to(tl.int64)
                pos = tl.where(ax_ok, pos, -1)
            else:
                pos = tl.load(pos_ptr + tok_off, mask=tok_mask, other=0).to(tl.int64)[:, None]
        else:
            # Packed varlen: sequence n owns tokens [cu[n], cu[n+1]); binary search for the largest n with
            # cu[n] <= t (n_search = ceil(log2(n_seqs)) rounds; empty sequences are skipped naturally).
            lo = tl.zeros([BLOCK_T], dtype=tl.int64)
            hi = tl.zeros([BLOCK_T], dtype=tl.int64) + (n_seqs - 1)
            i = 0
            while i < n_search:
                mid = (lo + hi + 1) // 2
                go = tl.load(pos_ptr + mid * stride_pos_s, mask=tok_mask, other=0).to(tl.int64) <= t
                lo = tl.where(go, mid, lo)
                hi = tl.where(go, hi, mid - 1)
                i += 1
            start = tl.load(pos_ptr + lo * stride_pos_s, mask=tok_mask, other=0).to(tl.int64)
            end = tl.load(pos_ptr + n_seqs * stride_pos_s).to(tl.int64)
            if SEQ_OFFSETS:
                base = tl.load(off_ptr + lo * stride_off, mask=tok_mask, other=0).to(tl.int64)
            else:
                base = offset
            # Tokens past cu_seqlens[-1] (a padded graph bucket) belong to no sequence: position 0.
            pos = tl.where(t < end, t - start + base, 0)[:, None]
        # ---- cos/sin in ACC
        if ANGLES == 0:
            # Table rows outside the table read as NaN (only reachable when host-side value checks are
            # skipped, e.g. under CUDA graph capture): a loud result instead of an out-of-bounds read.
            cm = tok_mask[:, None] & (pos >= 0) & (pos < n_rows) & cmask
            cos = tl.load(cos_ptr + pos * stride_cos_p + c, mask=cm, other=float("nan")).to(ACC)
            sin = tl.load(sin_ptr + pos * stride_sin_p + c, mask=cm, other=float("nan")).to(ACC)
        else:
            inv = tl.load(inv_ptr + c, mask=cmask, other=0.0)
            if ANGLES == 1:
                # HF numerics: one fp32 product, then fp32 cos/sin.
                angle = pos.to(tl.float32) * inv.to(tl.float32)
            else:
                # Exact: fp64 product, reduced mod 2*pi with 2*pi split in two fp32-representable parts (so
                # k * part is exact in fp64 for any k < 2**29), then fp32 cos/sin of an angle in [-pi, pi].
                a = pos.to(tl.float64) * inv.to(tl.float64)
                kk = tl.floor(a * 0.15915494309189535 + 0.5)
                angle = ((a - kk * 6.2831854820251465) - kk * -1.7484556025237907e-07).to(tl.float32)
            if MULTI_AXIS:
                angle = tl.where(pos >= 0, angle, float("nan"))  # only a bad axis makes pos < 0 here
            cos = (tl.cos(angle) * attention_factor).to(ACC)
            sin = (tl.sin(angle) * attention_factor).to(ACC)
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
# Pure-torch implementation (any device; the CPU path when no native kernel is built)
# ==============================================================================================
_TORCH_CHUNK_ELEMS = 1 << 21  # bounds the fp32 temporaries of the torch path (8 MiB each)
_TWO_PI_HI = 6.2831854820251465  # float32(2*pi): k * _TWO_PI_HI is exact in float64 for k < 2**29
_TWO_PI_LO = -1.7484556025237907e-07  # 2*pi - _TWO_PI_HI


class _RopeArgs(NamedTuple):
    """Everything but q/k, in the ops' argument order."""

    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]
    inv_freq: Optional[torch.Tensor]
    positions: Optional[torch.Tensor]
    offsets: Optional[torch.Tensor]
    offset: int
    cu_seqlens: Optional[torch.Tensor]
    axis_map: Optional[torch.Tensor]
    attention_factor: float
    interleaved: bool
    conjugate: bool
    exact: bool

    @property
    def half(self) -> int:
        return (self.cos if self.inv_freq is None else self.inv_freq).shape[-1]


def _exact_angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """fp32 angle within ~2e-7 rad of pos * inv_freq: a float64 product reduced mod 2*pi (as the kernel)."""
    a = pos.to(torch.float64) * inv_freq.to(torch.float64)
    k = torch.floor(a * (0.5 / math.pi) + 0.5)
    return ((a - k * _TWO_PI_HI) - k * _TWO_PI_LO).to(torch.float32)


def _angles_torch(pos: torch.Tensor, a: _RopeArgs, acc: torch.dtype):
    """cos/sin ``[..., half]`` for positions ``pos`` ``[..., 1]`` (one axis) or ``[..., half]`` (per
    frequency axis), from the tables or on the fly, with the kernels' numerics."""
    if a.inv_freq is None:
        if pos.shape[-1] == 1:
            r = pos[..., 0]
            return a.cos[r].to(acc), a.sin[r].to(acc)
        col = torch.arange(a.half, device=pos.device)
        return a.cos[pos, col].to(acc), a.sin[pos, col].to(acc)
    if a.exact:
        angle = _exact_angles(pos, a.inv_freq)
    else:
        angle = pos.to(torch.float32) * a.inv_freq.to(torch.float32)  # one fp32 product (HF numerics)
    return (angle.cos() * a.attention_factor).to(acc), (angle.sin() * a.attention_factor).to(acc)


def _rotate_torch(x_in, x_out, rows, a: _RopeArgs):
    """Rotate ``x_in`` ``[B, S, H, D]`` into ``x_out`` (which may be ``x_in``) chunk by chunk along S, math
    in fp32/fp64. ``rows`` is ``[B, S]`` (or ``[A, B, S]`` with an axis map), possibly expanded.

    Temporaries are bounded by the chunk size, never proportional to the input."""
    B, S, H, D = x_in.shape
    half = a.half
    R = 2 * half
    acc = torch.float64 if x_in.dtype == torch.float64 else torch.float32
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, B * H * R))
    shared_rows = rows.stride(-2) == 0  # same rows for every sequence: build cos/sin once
    axis = a.axis_map.to(device=rows.device, dtype=torch.int64) if a.axis_map is not None else None
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[..., :1, s0:s1] if shared_rows else rows[..., s0:s1]
        pos = r[axis].permute(1, 2, 0) if axis is not None else r[..., None]  # [b, s, half or 1]
        c, sn = _angles_torch(pos, a, acc)
        c, sn = c.unsqueeze(2), sn.unsqueeze(2)
        if a.conjugate:
            sn = -sn
        xi = x_in[:, s0:s1, :, :R]
        xo = x_out[:, s0:s1, :, :R]
        if a.interleaved:
            pairs = xi.unflatten(-1, (half, 2))
            x1, x2 = pairs[..., 0].to(acc), pairs[..., 1].to(acc)
        else:
            x1, x2 = xi[..., :half].to(acc), xi[..., half:].to(acc)
        # Both outputs are computed before either is written back (for fp32 x1/x2 alias the input).
        o1 = torch.addcmul(x1 * c, x2, sn, value=-1)
        o2 = torch.addcmul(x2 * c, x1, sn)
        if a.interleaved:
            xo.unflatten(-1, (half, 2)).copy_(torch.stack((o1, o2), dim=-1))
        else:
            xo[..., :half].copy_(o1)
            xo[..., half:].copy_(o2)
        if x_out is not x_in and R < D:
            x_out[:, s0:s1, :, R:].copy_(x_in[:, s0:s1, :, R:])


def _cu_positions(a: _RopeArgs, n_tokens: int) -> torch.Tensor:
    """Per-token positions ``[T]`` of a packed batch (no host sync: the values were checked before)."""
    seq = torch.searchsorted(a.cu_seqlens[1:], torch.arange(n_tokens, device=a.cu_seqlens.device), right=True)
    seq = seq.clamp_(max=a.cu_seqlens.shape[0] - 2)
    cu = a.cu_seqlens.to(torch.int64)
    t = torch.arange(n_tokens, device=cu.device)
    base = a.offsets.to(torch.int64)[seq] if a.offsets is not None else a.offset
    return torch.where(t < cu[-1], t - cu[seq] + base, 0)


def _token_rows(a: _RopeArgs, B: int, S: int, device) -> torch.Tensor:
    """Positions of every token: ``[B, S]``, or ``[A, B, S]`` with an axis map (int64, maybe expanded)."""
    if a.cu_seqlens is not None:
        return _cu_positions(a, S)[None, :]
    if a.axis_map is not None:
        p = a.positions.to(torch.int64)
        return p[:, None, :].expand(-1, B, S) if p.dim() == 2 else p
    return token_positions(a.positions, a.offsets, a.offset, B, S, device)


def _rope_torch(q, k, q_out, k_out, a: _RopeArgs):
    rows = _token_rows(a, q.shape[0], q.shape[1], q.device)
    _rotate_torch(q, q_out, rows, a)
    if k is not None:
        _rotate_torch(k, k_out, rows, a)


# ==============================================================================================
# Validation and launchers
# ==============================================================================================


def _check_angles(a: _RopeArgs, D: int, dev) -> int:
    """Tables or frequencies; returns R/2."""
    if a.inv_freq is None:
        if a.cos is None or a.sin is None:
            raise ValueError("pass cos and sin tables, or inv_freq for on-the-fly angles")
        for name, t in (("cos", a.cos), ("sin", a.sin)):
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
        if a.cos.shape != a.sin.shape:
            raise ValueError(f"cos and sin must have the same shape, got {tuple(a.cos.shape)} and {tuple(a.sin.shape)}")
        if a.attention_factor != 1.0:
            raise ValueError(
                "attention_factor scales on-the-fly angles (inv_freq); tables carry it already "
                "(rope_cos_sin(..., attention_factor=...))"
            )
        if a.exact:
            raise ValueError("exact applies to on-the-fly angles: pass inv_freq (float64) instead of cos/sin tables")
        half = a.cos.shape[1]
        what = "cos must have R/2 >= 1 columns (R = rotary dim), got 0"
        src = "2 * cos.shape[-1]"
    else:
        if a.cos is not None or a.sin is not None:
            raise ValueError("pass cos/sin tables or inv_freq, not both")
        check_tensor("inv_freq", a.inv_freq, dtypes=FLOAT_DTYPES, ndim=1, device=dev)
        if a.exact and a.inv_freq.dtype != torch.float64:
            raise TypeError(
                "exact=True needs inv_freq in float64 (rope_frequencies(..., dtype=torch.float64)): an fp32 "
                f"frequency alone is up to 0.25 rad off at position 2**22; got {a.inv_freq.dtype}"
            )
        if not math.isfinite(a.attention_factor):
            raise ValueError(f"attention_factor must be finite, got {a.attention_factor!r}")
        half = a.inv_freq.shape[0]
        what = "inv_freq must have R/2 >= 1 entries (R = rotary dim), got 0"
        src = "2 * inv_freq.shape[0]"
    if half == 0:
        raise ValueError(what)
    if 2 * half > D:
        raise ValueError(f"rotary dim R = {src} = {2 * half} exceeds head_dim D = {D}")
    return half


def _check_positions(a: _RopeArgs, B: int, S: int, packed: bool, half: int, dev) -> None:
    if a.cu_seqlens is not None:
        if not packed:
            raise ValueError("cu_seqlens needs packed q/k [T, H, D] (tokens of all sequences back to back)")
        cu = a.cu_seqlens
        if cu.dtype == torch.bool or cu.dtype not in INT_DTYPES:
            raise TypeError(f"cu_seqlens must be an integer tensor, got dtype {cu.dtype}")
        check_tensor("cu_seqlens", cu, ndim=1, device=dev)
        if cu.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be [N + 1] with N >= 1 sequences, got shape {tuple(cu.shape)}")
        if a.positions is not None:
            raise ValueError("pass positions or cu_seqlens, not both")
        if a.axis_map is not None:
            raise ValueError("axis_map needs explicit positions [A, ...]; it cannot be combined with cu_seqlens")
        check_position_args(None, a.offsets, a.offset, batch=cu.shape[0] - 1, seqlen=S, device=dev)
        return
    if a.axis_map is not None:
        m = a.axis_map
        if m.dtype == torch.bool or m.dtype not in INT_DTYPES:
            raise TypeError(f"axis_map must be an integer tensor, got dtype {m.dtype}")
        check_tensor("axis_map", m, ndim=1, device=dev)
        if m.shape[0] != half:
            raise ValueError(f"axis_map must have one entry per frequency, [R/2] = [{half}], got {tuple(m.shape)}")
        if a.positions is None:
            raise ValueError("axis_map needs positions [A, B, S] or [A, S] (one row of positions per axis)")
        p = a.positions
        check_tensor("positions", p, ndim=(2, 3), device=dev)
        want = [(S,), (B, S)]
        if tuple(p.shape[1:]) not in want or p.shape[0] < 1:
            raise ValueError(
                f"with axis_map, positions must be [A, S] = [A, {S}] or [A, B, S] = [A, {B}, {S}], got {tuple(p.shape)}"
            )
        check_position_args(p[0], a.offsets, a.offset, batch=B, seqlen=S, device=dev)
        return
    check_position_args(a.positions, a.offsets, a.offset, batch=B, seqlen=S, device=dev)


def _value_checks_on(dev) -> bool:
    return value_checks_enabled() and not on_cuda_graph_capture(dev)


def _check_position_values(a: _RopeArgs, S: int, dev) -> None:
    """Checks that read tensor values (a host sync on CUDA; skipped under graph capture or when turned off)."""
    if a.cu_seqlens is not None:
        if not _value_checks_on(dev):
            return
        # Every statistic in one device tensor, read back with one host sync.
        cu = a.cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        start = a.offsets.to(torch.int64) if a.offsets is not None else torch.full_like(lengths, a.offset)
        used = lengths > 0
        big = torch.iinfo(torch.int64).max
        lo = torch.where(used, start, big).min()
        hi = torch.where(used, start + lengths - 1, -big).max()
        first, last, decreasing, lo, hi = torch.stack((cu[0], cu[-1], (lengths < 0).any().long(), lo, hi)).tolist()
        if first != 0 or decreasing:
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu.tolist()[:16]}")
        if last > S:
            raise ValueError(f"cu_seqlens[-1] = {last} exceeds the {S} packed tokens of q")
        if a.inv_freq is None:  # the rows used (by non-empty sequences) must lie in the table
            rows = a.cos.shape[0]
            if lo <= hi and (lo < 0 or hi >= rows):
                raise ValueError(
                    f"offsets + positions within each sequence must lie in [0, {rows}) (the table's rows), "
                    f"got rows in [{lo}, {hi}]"
                )
            if last < S and rows < 1:
                raise ValueError("padded tokens past cu_seqlens[-1] use table row 0, but the table is empty")
        return
    if a.axis_map is not None and a.axis_map.numel() and _value_checks_on(dev):
        lo, hi = (int(v) for v in torch.aminmax(a.axis_map.to(torch.int64)))
        if lo < 0 or hi >= a.positions.shape[0]:
            raise ValueError(f"axis_map values must lie in [0, {a.positions.shape[0]}) (positions' axes), got [{lo}, {hi}]")
    if a.inv_freq is None:
        check_position_values(a.positions, a.offsets, a.offset, seqlen=S, num_rows=a.cos.shape[0], device=dev)


# Set while a launch reuses position tensors another launch of the same call just checked: backward
# re-applying the rotation with the tensors forward saved (autograd's saved-tensor version check catches
# any in-place change since), or k's launch after q's under autograd. Skips the value checks and their
# host sync on CUDA. Thread-local: CUDA backward runs on autograd's device threads, each call synchronously
# within one.
_backward_state = threading.local()


@contextlib.contextmanager
def _positions_checked():
    """Skip the position-value checks inside (their tensors were just checked by another launch)."""
    if torch.compiler.is_compiling():
        yield
        return
    _backward_state.values_checked = True
    try:
        yield
    finally:
        _backward_state.values_checked = False


def _check_rope(q, k, a: _RopeArgs, *, inplace: bool, values: bool, rows: bool = True) -> None:
    """Every check runs before anything is written. ``values`` adds the checks that need real tensors
    (aliasing, overlap and, with ``rows``, the position values - a host sync on CUDA): the op
    implementations run them, fakes and traced code cannot."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    dev = q.device
    packed = q.dim() == 3
    B, S = (1, q.shape[0]) if packed else (q.shape[0], q.shape[1])
    D = q.shape[-1]
    check_last_stride("q", q)
    if k is not None:
        check_tensor("k", k, ndim=q.dim(), device=dev)
        if k.dtype != q.dtype:
            raise TypeError(f"k must have the same dtype as q ({q.dtype}), got {k.dtype}")
        if packed and (k.shape[0], k.shape[2]) != (S, D):
            raise ValueError(f"k must be [T, Hk, D] = [{S}, Hk, {D}] to match q, got {tuple(k.shape)}")
        if not packed and (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
            raise ValueError(f"k must be [B, S, Hk, D] = [{B}, {S}, Hk, {D}] to match q, got {tuple(k.shape)}")
        check_last_stride("k", k)
        if inplace and k is q:
            raise ValueError("k must not overlap q: shared elements would be rotated twice")
    half = _check_angles(a, D, dev)
    _check_positions(a, B, S, packed, half, dev)
    if inplace and values:  # memory-layout checks need real tensors (fakes have no storage)
        check_writable("q", q)
        if k is not None:
            check_writable("k", k)
            check_disjoint("q", q, "k", k)
    if values and rows and B * S > 0 and not getattr(_backward_state, "values_checked", False):
        _check_position_values(a, S, dev)  # zero tokens is a no-op whatever the table


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


def _rope_triton(q, k, q_out, k_out, a: _RopeArgs):
    B, S, Hq, D = q.shape
    Hk = k.shape[2] if k is not None else 0
    n_tokens = B * S
    half = a.half
    if n_tokens == 0 or Hq + Hk == 0:
        return
    cos, sin, inv = a.cos, a.sin, a.inv_freq
    if inv is None:
        # Tables are read-only and small: a non-unit column stride is fixed with a copy of the table.
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
        angles, n_rows, scos, ssin = 0, cos.shape[0], cos.stride(0), sin.stride(0)
    else:
        inv = inv if inv.stride(0) == 1 else inv.contiguous()
        angles, n_rows, scos, ssin = (2 if a.exact else 1), 0, 0, 0
        cos = sin = inv  # dummies: no program reads them
    pos = off = axis = None
    spos_a = spos_b = spos_s = soff = saxis = 0
    n_seqs = n_search = n_axes = 0
    seq_offsets = False
    if a.cu_seqlens is not None:
        pos_mode, pos = POS_CU_SEQLENS, a.cu_seqlens
        n_seqs = a.cu_seqlens.shape[0] - 1
        n_search = (n_seqs - 1).bit_length()
        spos_s = a.cu_seqlens.stride(0)
        if a.offsets is not None:
            seq_offsets, off, soff = True, a.offsets, a.offsets.stride(0)
    elif a.positions is not None:
        pos_mode, pos = POS_POSITIONS, a.positions
        p = pos[0] if a.axis_map is not None else pos
        spos_b = p.stride(0) if p.dim() == 2 else 0
        spos_s = p.stride(-1)
        if a.axis_map is not None:
            spos_a, axis, saxis, n_axes = pos.stride(0), a.axis_map, a.axis_map.stride(0), pos.shape[0]
    elif a.offsets is not None:
        pos_mode, off, soff = POS_OFFSETS, a.offsets, a.offsets.stride(0)
    else:
        pos_mode = POS_OFFSET
    kk = k if k is not None else q  # dummies when k is absent: no program touches them
    ko = k_out if k_out is not None else q_out
    copy_tail = q_out is not q and 2 * half < D
    tail = D - 2 * half
    block_half, block_tail, block_h, block_t, num_warps = _rope_blocks(half, tail if copy_tail else 0, Hq, Hk, n_tokens)
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(Hq, block_h) + triton.cdiv(Hk, block_h))
    with device_guard(q):
        _rope_kernel[grid](
            q, kk, q_out, ko, cos, sin, inv, pos, off, axis,
            n_tokens, S, Hq, Hk, n_rows, a.offset, n_seqs, n_search, n_axes, float(a.attention_factor),
            q.stride(0), q.stride(1), q.stride(2),
            kk.stride(0), kk.stride(1), kk.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            ko.stride(0), ko.stride(1), ko.stride(2),
            scos, ssin, spos_a, spos_b, spos_s, soff, saxis,
            HALF=half, BLOCK_HALF=block_half, TAIL=tail, BLOCK_TAIL=max(block_tail, 1),
            BLOCK_T=block_t, BLOCK_H=block_h, POS_MODE=pos_mode, SEQ_OFFSETS=seq_offsets,
            MULTI_AXIS=a.axis_map is not None, ANGLES=angles, INTERLEAVED=a.interleaved,
            CONJUGATE=a.conjugate, COPY_TAIL=copy_tail, ACC=tl_acc_dtype(q.dtype), num_warps=num_warps,
        )  # fmt: skip


def _rope_native(q, k, q_out, k_out, a: _RopeArgs):
    from . import _native

    positions, offsets, offset = a.positions, a.offsets, a.offset
    if a.cu_seqlens is not None:  # the native kernels take per-token positions: O(T) int64, no sync
        positions, offsets, offset = _cu_positions(a, q.shape[1]), None, 0
    # The native kernels read int32/int64 positions; narrower integer types are widened (O(tokens)).
    if positions is not None and positions.dtype not in (torch.int32, torch.int64):
        positions = positions.to(torch.int64)
    if offsets is not None and offsets.dtype not in (torch.int32, torch.int64):
        offsets = offsets.to(torch.int64)
    _native.rope(
        q, k, q_out, k_out, a.cos, a.sin, a.inv_freq, positions, offsets, offset,
        float(a.attention_factor), a.interleaved, a.conjugate, a.exact,
    )  # fmt: skip


def _as_4d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.unsqueeze(0) if t is not None and t.dim() == 3 else t


def _rope_dispatch(q, k, q_out, k_out, a: _RopeArgs):
    q, k, q_out, k_out = _as_4d(q), _as_4d(k), _as_4d(q_out), _as_4d(k_out)
    if q.shape[0] * q.shape[1] == 0:
        return  # zero tokens: nothing to do
    backend = resolve_backend(q.device, native="rope")
    if backend == "native" and a.axis_map is not None:
        backend = "triton" if HAS_TRITON and q.device.type == "cuda" else "torch"  # no native axis maps
    impl = {"triton": _rope_triton, "native": _rope_native}.get(backend, _rope_torch)
    impl(q, k, q_out, k_out, a)


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
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    inv_freq: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    cu_seqlens: Optional[torch.Tensor],
    axis_map: Optional[torch.Tensor],
    attention_factor: float,
    interleaved: bool,
    conjugate: bool,
    exact: bool,
) -> None:
    """In place: q, k <- rotate(q, k) (by -theta when ``conjugate``). One kernel launch for both."""
    a = _RopeArgs(cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, attention_factor,
                  interleaved, conjugate, exact)  # fmt: skip
    _check_rope(q, k, a, inplace=True, values=True)
    _rope_dispatch(q, k, q, k, a)


@_rope_inplace_op.register_fake
def _(q, k, *rest):
    _check_rope(q, k, _RopeArgs(*rest), inplace=True, values=False)


@torch.library.custom_op("posenc::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    inv_freq: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    cu_seqlens: Optional[torch.Tensor],
    axis_map: Optional[torch.Tensor],
    attention_factor: float,
    interleaved: bool,
    conjugate: bool,
    exact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: returns (rotated q, rotated k); with k None the second output is an empty tensor."""
    a = _RopeArgs(cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, attention_factor,
                  interleaved, conjugate, exact)  # fmt: skip
    _check_rope(q, k, a, inplace=False, values=True)
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k) if k is not None else None
    _rope_dispatch(q, k, q_out, k_out, a)
    return q_out, (k_out if k_out is not None else q.new_empty(0))


@_rope_op.register_fake
def _(q, k, *rest):
    _check_rope(q, k, _RopeArgs(*rest), inplace=False, values=False)
    return torch.empty_like(q), (torch.empty_like(k) if k is not None else q.new_empty(0))


def _unit_stride(g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Upstream gradients can be expanded (stride 0) views; the kernels need stride(-1) == 1.
    return g if g is None or g.stride(-1) == 1 or g.shape[-1] <= 1 else g.contiguous()


_TENSOR_ARGS = ("cos", "sin", "inv_freq", "positions", "offsets", "cu_seqlens", "axis_map")


def _rope_setup_context(ctx, inputs, output):
    a = _RopeArgs(*inputs[2:])
    ctx.save_for_backward(*(getattr(a, n) for n in _TENSOR_ARGS))
    ctx.has_k = inputs[1] is not None
    ctx.scalars = (a.offset, a.attention_factor, a.interleaved, a.conjugate, a.exact)


def _rope_backward_common(ctx, grad_q, grad_k):
    t = dict(zip(_TENSOR_ARGS, ctx.saved_tensors))
    offset, attention_factor, interleaved, conjugate, exact = ctx.scalars
    a = _RopeArgs(t["cos"], t["sin"], t["inv_freq"], t["positions"], t["offsets"], offset, t["cu_seqlens"],
                  t["axis_map"], attention_factor, interleaved, not conjugate, exact)  # fmt: skip
    gk = _unit_stride(grad_k) if ctx.has_k else None
    with _positions_checked():  # forward checked these very tensors (saved, version-checked)
        gq, gk = torch.ops.posenc.rope(_unit_stride(grad_q), gk, *a)
    return gq, (gk if ctx.has_k else None)


_N_ROPE_ARGS = len(_RopeArgs._fields)


def _rope_backward(ctx, grad_q, grad_k):
    gq, gk = _rope_backward_common(ctx, grad_q, grad_k)
    return (gq, gk) + (None,) * _N_ROPE_ARGS


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
    def forward(ctx, x, *rest):
        torch.ops.posenc.rope_(x, None, *rest)
        _rope_setup_context(ctx, (x, None) + rest, None)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        gx, _ = _rope_backward_common(ctx, grad, None)
        return (gx,) + (None,) * _N_ROPE_ARGS


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


def _rope_args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact):
    offsets_t, offset = split_offsets(offsets)
    return _RopeArgs(cos, sin, inv_freq, positions, offsets_t, offset, cu_seqlens, axis_map,
                     float(attention_factor), bool(interleaved), False, bool(exact))  # fmt: skip


def _direct_call_ok(q, k, a: _RopeArgs) -> bool:
    """True when the op's implementation may run without the custom-op layer: eager code (not compiled,
    not jit-traced), plain CPU/CUDA tensors, no dispatch or function modes, no functorch transforms. That layer costs ~60 us per call of these
    14-argument ops in torch 2.13 (most of it in ``torch._library.utils.fill_defaults``), more than the
    kernel of a decode step; traced, faked, vmapped or intercepted calls still go through the op."""
    if torch.compiler.is_compiling() or _get_dispatch_mode() is not None or torch._C._get_tracing_state():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active():
        return False
    tensors = (q, k, a.cos, a.sin, a.inv_freq, a.positions, a.offsets, a.cu_seqlens, a.axis_map)
    return all(t is None or (type(t) is torch.Tensor and t.device.type in ("cpu", "cuda")) for t in tensors)


def _any_requires_grad(*ts) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _check_autograd_support(q, k, a: _RopeArgs) -> None:
    """Gradients flow into q and k only, in reverse mode: a table or frequency tensor that requires grad
    would silently get none, and a forward-mode tangent would be dropped, so both are errors."""
    if torch.autograd.forward_ad._current_level >= 0:
        for name, t in (("q", q), ("k", k)):
            if isinstance(t, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
                raise NotImplementedError(f"forward-mode AD is not supported by the RoPE ops ({name} is a dual tensor)")
    if torch.is_grad_enabled():
        for name in ("cos", "sin", "inv_freq"):
            t = getattr(a, name)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the RoPE ops give gradients for q and k only: pass "
                    f"{name}.detach() (or compute the rotation with differentiable tables yourself)"
                )


def _rope_inplace(q, k, a: _RopeArgs):
    _check_autograd_support(q, k, a)
    needs_grad = torch.is_grad_enabled() and _any_requires_grad(q, k)
    if needs_grad:
        # Everything is checked for both tensors before either is written - including the errors autograd
        # itself would raise, which a custom Function only raises after its forward ran. Traced code
        # (torch.compile) has no storage to inspect; tracing raises autograd's errors before running.
        real = not torch.compiler.is_compiling()
        # Position values are left to q's launch, which checks them before writing q (k shares them):
        # checking them here as well would be one more host sync per call on CUDA.
        _check_rope(q, k, a, inplace=True, values=real, rows=False)
        if real:
            check_inplace_autograd("q", q)
            if k is not None:
                check_inplace_autograd("k", k)
        q = _RopeInplaceFunction.apply(q, *a)
        if k is not None:
            with _positions_checked():  # q's launch checked the shared positions before writing q
                k = _RopeInplaceFunction.apply(k, *a)
        return q, k
    if _direct_call_ok(q, k, a):
        # What the op does, minus its Python dispatch layer; the version counters are bumped as the
        # dispatcher does for a mutating op, so autograd still sees the write.
        _check_rope(q, k, a, inplace=True, values=True)
        _rope_dispatch(q, k, q, k, a)
        torch.autograd.graph.increment_version([t for t in (q, k) if t is not None])
        return q, k
    torch.ops.posenc.rope_(q, k, *a)
    return q, k


def apply_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate ``q`` ``[B, S, Hq, D]`` and ``k`` ``[B, S, Hk, D]`` in place, in one kernel launch.

    See the module docstring for layouts, angle sources (``cos``/``sin`` tables or ``inv_freq``), packed
    ``[T, H, D]`` inputs with ``cu_seqlens`` and multi-axis positions (``axis_map``). Returns ``(q, k)``
    (the same tensors). Differentiable w.r.t. q and k under PyTorch's in-place rules (a leaf that requires
    grad raises, as for ``x.mul_``).

    >>> import torch, posenc_kernels as pk
    >>> q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 1, 16)
    >>> inv_freq, _ = pk.rope_frequencies(16)
    >>> cos, sin = pk.rope_cos_sin(5, inv_freq)
    >>> q2, k2 = pk.apply_rope_(q, k, cos, sin)
    >>> q2 is q
    True
    >>> q3, _ = pk.apply_rope_(torch.randn(7, 4, 16), None, inv_freq=inv_freq,  # packed, on the fly
    ...                        cu_seqlens=torch.tensor([0, 3, 7]))
    """
    return _rope_inplace(q, k, _rope_args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map,
                                          attention_factor, interleaved, exact))  # fmt: skip


def apply_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
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
    a = _rope_args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)
    _check_autograd_support(q, k, a)
    if not (torch.is_grad_enabled() and _any_requires_grad(q, k)) and _direct_call_ok(q, k, a):
        _check_rope(q, k, a, inplace=False, values=True)  # the op's body, without its dispatch layer
        q_out = torch.empty_like(q)
        k_out = torch.empty_like(k) if k is not None else None
        _rope_dispatch(q, k, q_out, k_out, a)
        return q_out, k_out
    q_out, k_out = torch.ops.posenc.rope(q, k, *a)
    return q_out, (k_out if k is not None else None)


def apply_rope_qkv_(
    qkv: torch.Tensor,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    num_heads_q: int,
    num_heads_kv: int,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate the q and k heads of a fused projection ``[B, S, Hq + 2*Hkv, D]`` (or packed
    ``[T, Hq + 2*Hkv, D]``) in place, in one launch; the v heads are untouched. Returns ``qkv``.

    Heads ``[0, Hq)`` are q, ``[Hq, Hq + Hkv)`` are k, the rest v (the layout of a fused QKV linear
    viewed as heads). Other arguments as in :func:`apply_rope_`.

    >>> import torch, posenc_kernels as pk
    >>> qkv = torch.randn(2, 6, 4 + 2 * 2, 32)
    >>> v = qkv[:, :, 6:].clone()
    >>> cos, sin = pk.rope_cos_sin(6, pk.rope_frequencies(32)[0])
    >>> out = pk.apply_rope_qkv_(qkv, cos, sin, num_heads_q=4, num_heads_kv=2)
    >>> out is qkv, torch.equal(qkv[:, :, 6:], v)
    (True, True)
    """
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    for name, n in (("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if qkv.shape[-2] != num_heads_q + 2 * num_heads_kv:
        raise ValueError(
            f"qkv must have Hq + 2*Hkv = {num_heads_q} + 2*{num_heads_kv} = {num_heads_q + 2 * num_heads_kv} "
            f"heads (dim -2), got {qkv.shape[-2]}"
        )
    q = qkv[..., :num_heads_q, :]
    k = qkv[..., num_heads_q : num_heads_q + num_heads_kv, :]
    a = _rope_args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)
    _rope_inplace(q, k, a)  # under autograd, in-place ops on the views rebase qkv's history
    return qkv


def mrope_axis_map(mrope_section, *, interleaved: bool = False, device=None) -> torch.Tensor:
    """Which position axis each frequency follows, for multi-axis RoPE (``axis_map`` of
    :func:`apply_rope_`), from a section list such as Qwen2-VL's ``mrope_section`` ``[16, 24, 24]``.

    ``interleaved=False`` (Qwen2-VL): frequencies ``[0, s0)`` follow axis 0 (time), the next ``s1`` axis 1
    (height), ... ``interleaved=True`` (Qwen3-VL): frequency ``i`` follows axis ``a = i % A`` when
    ``a >= 1`` and ``i < A * s_a``, else axis 0. 2-D axial RoPE for image patches is ``[n/2, n/2]`` with
    positions ``[2, ...]`` = (row, column) (see :func:`axial_positions`). Returns int32 ``[sum(sections)]``.

    >>> import posenc_kernels as pk
    >>> pk.mrope_axis_map([2, 1, 1])
    tensor([0, 0, 1, 2], dtype=torch.int32)
    >>> pk.mrope_axis_map([2, 2, 2], interleaved=True)
    tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    """
    sections = [int(v) for v in mrope_section]
    if not sections or any(v < 0 for v in sections) or sum(sections) == 0:
        raise ValueError(f"mrope_section must be non-negative ints with a positive sum, got {list(mrope_section)}")
    n_axes, half = len(sections), sum(sections)
    if not interleaved:
        axes = [a for a, n in enumerate(sections) for _ in range(n)]
    else:
        axes = []
        for i in range(half):
            a = i % n_axes
            axes.append(a if a >= 1 and i < n_axes * sections[a] else 0)
    return torch.tensor(axes, dtype=torch.int32, device=device)


def axial_positions(*sizes: int, device=None) -> torch.Tensor:
    """Positions ``[A, prod(sizes)]`` of a row-major grid (``axial_positions(H, W)`` gives each image patch
    its (row, column)), for 2-D / 3-D axial RoPE with :func:`mrope_axis_map`.

    >>> import posenc_kernels as pk
    >>> pk.axial_positions(2, 3)
    tensor([[0, 0, 0, 1, 1, 1],
            [0, 1, 2, 0, 1, 2]])
    """
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative ints, got {sizes}")
    grids = torch.meshgrid(*(torch.arange(n, device=device) for n in sizes), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids])
