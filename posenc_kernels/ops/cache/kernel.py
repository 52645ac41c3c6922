"""RoPE + KV-cache write on Triton: the launcher of the attention prologue kernel
(:func:`..qknorm.kernel._prologue_kernel`) with its cache stage on, so norm -> rope -> cache write is one
launch (the norm stage only when ``norm`` is not -1).

Grid: ``(B * token blocks, q head blocks + k head blocks + v head blocks)``. q and k programs are the RoPE
kernel's (no norm: :func:`..rope.kernel.rope_blocks`' tile, the same rotation expression, so q, k and the k
written are bit for bit ``apply_rope_`` then a scatter) or QK-norm's; k programs also write their rows into
the k cache. v programs (no angles) copy v rows into the v cache; their tile is sized apart (v's head_dim may
differ from k's: MLA's 512-wide latent), and the launch's warps cover the larger of the two tiles.

Host cost per call: the RoPE family's argument resolution, a few integer tests and the launch; no tensor is
allocated, nothing is read back (CUDA-graph capturable). A float scale's fp32 value and its correctly
rounded reciprocal are computed on the host once per value (cached); a scale tensor is read by the kernel.
"""

from __future__ import annotations

import functools
import struct

import torch

from ..checks import I32_MAX, cdiv, device_guard, max_element_offset, next_pow2, prev_pow2
from ..qknorm.kernel import _weight_args, qk_norm_rope_blocks
from ..qknorm.torch_impl import HEADS
from ..registry import HAS_TRITON
from ..rope.kernel import ROPE_TILE, ROPE_TILE_ANGLES, ROPE_TILE_AXES, angle_launch_args, rope_blocks
from .torch_impl import NONE

if HAS_TRITON:
    import triton.language as tl

    from ..qknorm.kernel import _prologue_kernel

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # the formats' largest finite values
V_TILE = 8192  # v elements per program (its heads fill it, at most 1024 channels at a time)
V_MAX_DV = 1024
V_PER_THREAD = 64  # v is only moved (and quantised): as many elements per thread as RoPE's tile


@functools.lru_cache(maxsize=256)
def _scale_pair(value: float) -> tuple:
    """A float scale as the kernel uses it: its fp32 value and the correctly rounded fp32 ``1 / value``
    (the double quotient rounded to fp32: double rounding is innocuous for a division, 53 >= 2 * 24 + 2)."""
    s = struct.unpack("f", struct.pack("f", value))[0]
    return s, struct.unpack("f", struct.pack("f", 1.0 / s))[0]


def _scale_args(t, value, dummy) -> tuple:
    """``(pointer, stride, value, reciprocal, MODE)``: MODE 1 a tensor (0-d / ``[1]``: stride 0; per head),
    2 a float, 0 none (not FP8)."""
    if t is not None:
        return t, 0 if t.numel() == 1 else t.stride(0), 1.0, 1.0, 1
    if value is not None:
        return (dummy, 0, *_scale_pair(float(value)), 2)
    return dummy, 0, 1.0, 1.0, 0


def v_blocks(Dv: int, Hk: int, block_t: int) -> tuple:
    """``(BLOCK_DV, BLOCK_HV, num_warps)`` of the v programs: all of v's channels at once (up to
    ``V_MAX_DV``), heads filling ``V_TILE`` elements, ``V_PER_THREAD`` elements per thread setting the warps."""
    block_dv = min(next_pow2(Dv), V_MAX_DV)
    block_hv = min(next_pow2(Hk), prev_pow2(max(1, V_TILE // (block_t * block_dv))))
    num_warps = prev_pow2(max(1, min(8, block_t * block_hv * block_dv // (32 * V_PER_THREAD))))
    return block_dv, block_hv, num_warps


def index_widths(q, k, v, q_o, k_o, q_fp8, tables, k_cache4, paged: bool) -> tuple:
    """``(IDX64, SLOT64)``: 64-bit offsets into q/k/v/q_fp8 (and the tables) only where one may not fit in 32
    bits; the slot's division by the block size in 64 bits only for a cache of more than 2**31 slots. Cache
    rows are addressed in 64 bits always (a cache is the largest tensor a model holds)."""
    idx64 = max(max_element_offset(t) for t in (q, k, v, q_o, k_o, q_fp8, *tables)) > I32_MAX
    slot64 = paged and k_cache4.shape[0] * k_cache4.shape[1] > I32_MAX
    return idx64, slot64


def rope_and_cache_triton(q, k, v, q_o, k_o, kc4, vc4, q_fp8, slot_mapping, cache_positions, k_scale, v_scale,
                          q_scale, k_scale_value, v_scale_value, q_scale_value, q_weight, k_weight, eps, norm,
                          weight_offset, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                          attention_factor, interleaved, conjugate, exact) -> None:  # fmt: skip
    """Launch for 4-D ``q``/``k``/``v`` ``[B, S, H, D]`` (packed inputs arrive as ``B = 1``) and NHD cache
    views ``[N0, N1, Hk, D]`` (op.py's ``_body``); the torch launcher's arguments."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    if B * S == 0 or Hq + Hk == 0:
        return
    half = (cos if inv_freq is None else inv_freq).shape[-1]
    angles, n_rows, inv_freq, tab, (mode, pos, spb, sps, off, soff, offset, n_seqs, cu_block, seq_off, spos_a, saxis,
                                    n_axes) = angle_launch_args(cos, sin, inv_freq, positions, offsets, offset,
                                                                cu_seqlens, axis_map, exact)  # fmt: skip
    has_norm = norm != NONE
    if has_norm:
        wq, wk, has_qw, has_kw = _weight_args(q, k, q_weight, k_weight)
        block_half, block_tail, block_h, block_t, num_warps = qk_norm_rope_blocks(D, half, Hq, Hk, S, norm,
                                                                                  interleaved)  # fmt: skip
    else:
        wq = wk = q  # dummies: no weight is read
        has_qw = has_kw = False
        tile = ROPE_TILE_AXES if axis_map is not None else ROPE_TILE if angles == 0 else ROPE_TILE_ANGLES
        if kc4.dtype in FP8_MAX or q_fp8 is not None:
            tile = (tile[0] // 2, tile[1] // 2)  # the quantisation's registers: half RoPE's tile
        block_half, block_tail, block_h, block_t, num_warps = rope_blocks(half, D - 2 * half, Hq, Hk, S, tile)
        block_tail = max(block_tail, 1)
    has_v = v is not None
    if has_v:
        Dv = v.shape[3]
        block_dv, block_hv, v_warps = v_blocks(Dv, Hk, block_t)
        if not has_norm:  # q/k tiles at least half of v's (MLA: 1 kv head of 64 beside a 512-wide latent)
            width = 2 * block_half + (block_tail if 2 * half < D else 0)
            while 2 * block_t * block_h * width < block_t * block_hv * block_dv and block_h < next_pow2(max(Hq, Hk)):
                block_h *= 2
        num_warps = max(num_warps, v_warps)
    n_s_blocks = cdiv(S, block_t)
    n_blocks = cdiv(Hq, block_h) + cdiv(Hk, block_h)
    if has_v:
        n_blocks += cdiv(Hk, block_hv)
        vv, vc, v_strides, vc_strides = v, vc4, v.stride(), vc4.stride()[:3]
    else:
        Dv = block_dv = block_hv = 1
        vv, vc, v_strides, vc_strides = q, kc4, (0, 0, 0, 0), (0, 0, 0)
    paged = slot_mapping is not None
    if paged:
        idx, n_slots, idx_strides = slot_mapping, slot_mapping.shape[0], (0, slot_mapping.stride(0))
    else:
        idx, n_slots = cache_positions, 0
        idx_strides = (cache_positions.stride(0), cache_positions.stride(1)) if cache_positions.dim() == 2 else (
            0, cache_positions.stride(0))  # fmt: skip
    tables = (cos, sin) if angles == 0 else ()
    idx64, slot64 = index_widths(q, k, v, q_o, k_o, q_fp8, tables, kc4, paged)
    k_fmax = FP8_MAX.get(kc4.dtype, 0.0)
    ks, sks, ksv, kr, ks_mode = _scale_args(k_scale, k_scale_value, q)
    vs, svs, vsv, vr, vs_mode = _scale_args(v_scale, v_scale_value, q)
    if q_fp8 is not None:
        qf, qf_strides, q_fmax = q_fp8, q_fp8.stride(), FP8_MAX[q_fp8.dtype]
        qs, sqs, qsv, qr, qs_mode = _scale_args(q_scale, q_scale_value, q)
    else:
        qf, qf_strides, q_fmax = kc4, (0, 0, 0, 0), 0.0
        qs, sqs, qsv, qr, qs_mode = q, 0, 1.0, 1.0, 0
    inplace = q_o is q and k_o is k
    grid = (B * n_s_blocks, n_blocks)
    with device_guard(q):
        _prologue_kernel[grid](
            q, k, q_o, k_o, wq, wk, tab[0], tab[1], inv_freq, pos, off, axis_map, vv, kc4, vc, qf, idx, ks, vs, qs,
            S, n_s_blocks, Hq, Hk, n_rows, offset, n_seqs, float(attention_factor), float(eps), float(weight_offset),
            n_slots, kc4.shape[1], ksv, kr, vsv, vr, qsv, qr,
            *q.stride(), *k.stride(), *q_o.stride(), *k_o.stride(), *tab[2:], spos_a, spb, sps, soff, saxis,
            *v_strides, *kc4.stride()[:3], *vc_strides, *qf_strides, *idx_strides, sks, svs, sqs,
            D=D, HALF=half, BLOCK_HALF=block_half, TAIL=D - 2 * half, BLOCK_TAIL=block_tail, BLOCK_T=block_t,
            BLOCK_H=block_h, POS_MODE=mode, SEQ_OFFSETS=seq_off, CU_BLOCK=cu_block, N_AXES=n_axes, ANGLES=angles,
            INTERLEAVED=interleaved, NORM=has_norm, NORM_HEADS=norm == HEADS, HAS_QW=has_qw, HAS_KW=has_kw,
            INPLACE=inplace, IDX64=idx64, ACC=tl.float64 if q.dtype.itemsize == 8 else tl.float32,
            CACHE=1 if paged else 2, SLOT64=slot64, K_FMAX=k_fmax, KS_MODE=ks_mode, HAS_V=has_v, DV=Dv,
            BLOCK_DV=block_dv, BLOCK_HV=block_hv, VS_MODE=vs_mode, Q_FMAX=q_fmax, QS_MODE=qs_mode,
            num_warps=num_warps,
        )  # fmt: skip
