"""RoPE + KV-cache write in pure torch (any device): the ``torch`` backend and the CPU path without the
extension. The same steps as the unfused sequence it replaces: the RoPE family's rotation (or QK-norm +
RoPE's) into q and k, then the rotated k and v scattered into the cache (quantised for an FP8 cache).
Also the FP8 quantisation rule every backend shares (:func:`quantise`)."""

from __future__ import annotations

from typing import Optional

import torch

from ..qknorm.torch_impl import qk_norm_rope_torch
from ..rope.op import RopeArgs
from ..rope.torch_impl import rope_torch

NONE = -1  # norm code: no QK-norm stage (HEAD, HEADS as in the QK-norm family)
NHD, HND = 0, 1  # kv_layout codes
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantise(x: torch.Tensor, scale: Optional[torch.Tensor], scale_value: Optional[float], dtype: torch.dtype):
    """What a cache of ``dtype`` stores for ``x`` ``[..., H, D]``: ``x`` itself in its own dtype; for FP8,
    ``fp32(x) / scale`` (``scale`` a 0-d / ``[1]`` / ``[H]`` tensor, else ``scale_value``) clamped to the
    format's finite range, then rounded to nearest even: a finite input never becomes NaN or inf."""
    if dtype not in FP8_DTYPES:
        return x.to(dtype)
    if scale is None:
        s = float(torch.tensor(scale_value, dtype=torch.float32))  # the fp32 value (a Python float: no tensor)
    else:
        s = scale.to(torch.float32)
        if s.dim() == 1 and s.shape[0] > 1:
            s = s[:, None]  # per head: [H, 1] broadcasts over [..., H, D]
    fmax = torch.finfo(dtype).max
    return (x.to(torch.float32) / s).clamp(-fmax, fmax).to(dtype)


def cache_index(slot_mapping, cache_positions, n_tokens_b: int, batch: int, block_size: int):
    """``(outer, inner, valid)`` ``[B, S]`` int64 for each token: the cache row it goes to (paged: block and
    offset of its slot; contiguous: its sequence and cache position) and whether it is written (slot or
    position -1, and tokens past ``len(slot_mapping)``, are not)."""
    if slot_mapping is not None:
        S = n_tokens_b
        slots = torch.full((S,), -1, dtype=torch.int64, device=slot_mapping.device)
        slots[: slot_mapping.shape[0]] = slot_mapping.to(torch.int64)
        valid = slots >= 0
        s = slots.clamp_min(0)
        return (s // block_size)[None], (s % block_size)[None], valid[None]
    p = cache_positions.to(torch.int64)
    if p.dim() == 1:
        p = p[None].expand(batch, -1)
    outer = torch.arange(batch, device=p.device)[:, None].expand_as(p)
    return outer, p.clamp_min(0), p >= 0


def write_cache(cache4: torch.Tensor, x: torch.Tensor, outer, inner, valid, scale, scale_value) -> None:
    """Scatter ``x`` ``[B, S, H, D]`` into ``cache4`` (the NHD view ``[N0, N1, H, D]``) at the valid rows."""
    o, i = outer[valid], inner[valid]
    cache4[o, i] = quantise(x[valid], scale, scale_value, cache4.dtype)


def rope_and_cache_torch(q, k, v, q_o, k_o, k_cache4, v_cache4, q_fp8, slot_mapping, cache_positions, block_size,
                         k_scale, v_scale, q_scale, k_scale_value, v_scale_value, q_scale_value,
                         q_weight, k_weight, eps, norm, weight_offset, rope_rest) -> None:  # fmt: skip
    """4-D ``q``/``k``/``v`` ``[B, S, H, D]`` (``v`` and ``v_cache4`` may be None: a k-only cache); ``q_o``/``k_o`` receive the rotated values (q and k in place);
    the caches are NHD views ``[N0, N1, Hk, D]``. With ``q_fp8`` the rotated q goes there (quantised) and
    ``q_o`` is not written."""
    q_rot = torch.empty_like(q) if q_fp8 is not None else q_o
    if norm == NONE:
        rope_torch(q, k, q_rot, k_o, RopeArgs(*rope_rest))
    else:
        qk_norm_rope_torch(q, k, q_rot, k_o, q_weight, k_weight, eps, norm, weight_offset, *rope_rest)
    if q_fp8 is not None:
        q_fp8.copy_(quantise(q_rot, q_scale, q_scale_value, q_fp8.dtype))
    B, S = k.shape[0], k.shape[1]
    if B * S == 0:
        return
    outer, inner, valid = cache_index(slot_mapping, cache_positions, S, B, block_size)
    write_cache(k_cache4, k_o, outer, inner, valid, k_scale, k_scale_value)
    if v is not None:
        write_cache(v_cache4, v, outer, inner, valid, v_scale, v_scale_value)
