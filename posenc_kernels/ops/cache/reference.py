"""RoPE + KV-cache write references, written for clarity.

* :func:`rope_and_cache_reference`: the definition. q and k normalised (optionally) and rotated in float64
  (:func:`..qknorm.reference.qk_norm_rope_reference`, :func:`..rope.reference.rope_reference`); the cache
  rows of the written tokens replaced by the rotated k rounded to k's dtype (what ``apply_rope_`` leaves in
  k), and by v; for an FP8 cache those values quantised as :func:`quantise_reference` says.
* :func:`rope_then_cache_eager`: the unfused sequence a call site runs today (``apply_rope_`` then a scatter
  into the cache, quantising for FP8): the exactness baseline and the benchmarks' eager provider.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..qknorm.reference import qk_norm_rope_reference
from ..rope.reference import rope_reference

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantise_reference(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """FP8 storage of ``x`` ``[..., H, D]``: ``x / scale`` in float64 (``scale`` a float, a 0-d tensor or per
    head ``[H]``), clamped to +-the format's largest finite value, rounded to nearest even. Any other
    ``dtype`` stores ``x`` cast to it."""
    if dtype not in FP8:
        return x.to(dtype)
    s = torch.as_tensor(scale, dtype=torch.float64, device=x.device)
    if s.dim() == 1 and s.shape[0] > 1:
        s = s[:, None]
    y = (x.to(torch.float64) / s).to(torch.float32)  # x / scale in fp32 (x is exact in fp32; one rounding)
    fmax = torch.finfo(dtype).max
    return y.clamp(-fmax, fmax).to(dtype)


def _rows(slot_mapping, cache_positions, B: int, S: int, block_size: int):
    """Per written token ``(b, s, outer, inner)`` as Python lists (a loop; clarity over speed)."""
    out = []
    for b in range(B):
        for s in range(S):
            if slot_mapping is not None:
                slot = int(slot_mapping[s]) if s < slot_mapping.shape[0] else -1
                if slot >= 0:
                    out.append((b, s, slot // block_size, slot % block_size))
            else:
                p = cache_positions if cache_positions.dim() == 1 else cache_positions[b]
                if int(p[s]) >= 0:
                    out.append((b, s, b, int(p[s])))
    return out


def rope_and_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    slot_mapping: Optional[torch.Tensor] = None,
    cache_positions: Optional[torch.Tensor] = None,
    kv_layout: str = "NHD",
    k_scale=None,
    v_scale=None,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
    q_weight: Optional[torch.Tensor] = None,
    k_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    norm: Optional[str] = None,
    weight_offset: float = 0.0,
):
    """Returns ``(q, k, k_cache, v_cache)``: q and k in float64, new caches in the caches' dtype (the inputs
    are not modified). q/k/v ``[T, H, D]`` (paged) or ``[B, S, H, D]``; ``norm`` "head"/"heads" adds the
    QK-norm stage."""
    packed = q.dim() == 3
    q4, k4 = (q[None], k[None]) if packed else (q, k)
    v4 = (v[None] if packed else v) if v is not None else None
    pos = positions[None] if packed and positions is not None and positions.dim() == 1 else positions
    if norm is None:
        qo, ko = rope_reference(q4, k4, cos, sin, positions=pos, offsets=offsets, interleaved=interleaved)
    else:
        qo, ko = qk_norm_rope_reference(q4, k4, q_weight, k_weight, cos, sin, eps=eps, norm=norm,
                                        weight_offset=weight_offset, positions=pos, offsets=offsets,
                                        interleaved=interleaved)  # fmt: skip
    kc, vc = k_cache.clone(), (v_cache.clone() if v_cache is not None else None)
    kc4 = kc.transpose(1, 2) if kv_layout == "HND" else kc
    vc4 = (vc.transpose(1, 2) if kv_layout == "HND" else vc) if vc is not None else None
    k_stored = ko.to(k.dtype)  # what apply_rope_ leaves in k
    B, S = k4.shape[0], k4.shape[1]
    for b, s, o, i in _rows(slot_mapping, cache_positions, B, S, kc4.shape[1]):
        kc4[o, i] = quantise_reference(k_stored[b, s], k_scale, kc.dtype)
        if vc4 is not None:
            vc4[o, i] = quantise_reference(v4[b, s], v_scale, vc.dtype)
    if packed:
        qo, ko = qo[0], ko[0]
    return qo, ko, kc, vc


def rope_then_cache_eager(q, k, v, k_cache, v_cache, cos, sin, *, slot_mapping=None, cache_positions=None,
                          kv_layout="NHD", k_scale=None, v_scale=None, positions=None, offsets=0,
                          interleaved=False):  # fmt: skip
    """The unfused sequence, in place: ``apply_rope_(q, k)`` then the rotated k and v scattered into the
    caches (``index_put_``; FP8 quantised first). Returns ``(q, k)``."""
    from ...ops.rope.api import apply_rope_

    apply_rope_(q, k, cos, sin, positions=positions, offsets=offsets, interleaved=interleaved)
    kc4 = k_cache.transpose(1, 2) if kv_layout == "HND" else k_cache
    vc4 = v_cache.transpose(1, 2) if kv_layout == "HND" and v_cache is not None else v_cache
    if slot_mapping is not None:
        n = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.int64)
        keep = slots >= 0
        bs = kc4.shape[1]
        idx = (slots[keep] // bs, slots[keep] % bs)
        kc4.index_put_(idx, quantise_reference(k[:n][keep], k_scale, k_cache.dtype))
        if v is not None:
            vc4.index_put_(idx, quantise_reference(v[:n][keep], v_scale, v_cache.dtype))
    else:
        p = cache_positions.to(torch.int64)
        if p.dim() == 1:
            p = p[None].expand(k.shape[0], -1)
        keep = p >= 0
        b = torch.arange(k.shape[0], device=p.device)[:, None].expand_as(p)
        idx = (b[keep], p[keep])
        kc4.index_put_(idx, quantise_reference(k[keep], k_scale, k_cache.dtype))
        if v is not None:
            vc4.index_put_(idx, quantise_reference(v[keep], v_scale, v_cache.dtype))
    return q, k
