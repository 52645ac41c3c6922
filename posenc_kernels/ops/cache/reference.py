"""RoPE + KV-cache write references, written for clarity.

* :func:`rope_and_cache_reference`: the definition. q and k normalised (optionally) and rotated in float64
  (:func:`..qknorm.reference.qk_norm_rope_reference`, :func:`..rope.reference.rope_reference`); the cache
  rows of the written tokens replaced by the rotated k rounded to k's dtype (what ``apply_rope_`` leaves in
  k), and by v; for an FP8 cache those values quantised as :func:`quantise_reference` says.
* :func:`write_cache_reference`: the scatter alone, row by row (in place): the unfused sequence's second step,
  which the tests run after ``apply_rope_`` / ``qk_norm_rope_`` on the same backend (the exactness baseline).
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


def written_rows(slot_mapping, cache_positions, B: int, S: int, block_size: int) -> list:
    """``[(b, s, outer, inner)]`` of every written token: its cache row (paged: block and offset of its slot;
    contiguous: its sequence and cache position); slot or position -1, and tokens past ``len(slot_mapping)``,
    are left out. A loop: clarity over speed."""
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
    pos = positions[None] if packed and positions is not None and positions.dim() == 1 else positions
    if norm is None:
        qo, ko = rope_reference(q4, k4, cos, sin, positions=pos, offsets=offsets, interleaved=interleaved)
    else:
        qo, ko = qk_norm_rope_reference(q4, k4, q_weight, k_weight, cos, sin, eps=eps, norm=norm,
                                        weight_offset=weight_offset, positions=pos, offsets=offsets,
                                        interleaved=interleaved)  # fmt: skip
    if packed:
        qo, ko = qo[0], ko[0]
    kc, vc = k_cache.clone(), (v_cache.clone() if v_cache is not None else None)
    write_cache_reference(ko.to(k.dtype), v, kc, vc, slot_mapping=slot_mapping, cache_positions=cache_positions,
                          kv_layout=kv_layout, k_scale=k_scale, v_scale=v_scale)  # k as apply_rope_ leaves it
    return qo, ko, kc, vc


def write_cache_reference(k, v, k_cache, v_cache, *, slot_mapping=None, cache_positions=None, kv_layout="NHD",
                          k_scale=None, v_scale=None) -> None:
    """In place: the cache rows of the written tokens (:func:`written_rows`) replaced by ``k`` and ``v``
    (``[T, H, D]`` with ``slot_mapping``, else ``[B, S, H, D]``), quantised as :func:`quantise_reference`
    says for an FP8 cache. ``v`` / ``v_cache`` may be None (a k-only cache)."""
    packed = k.dim() == 3
    k4 = k[None] if packed else k
    v4 = (v[None] if packed else v) if v is not None else None
    kc4 = k_cache.transpose(1, 2) if kv_layout == "HND" else k_cache
    vc4 = (v_cache.transpose(1, 2) if kv_layout == "HND" else v_cache) if v_cache is not None else None
    for b, s, o, i in written_rows(slot_mapping, cache_positions, k4.shape[0], k4.shape[1], kc4.shape[1]):
        kc4[o, i] = quantise_reference(k4[b, s], k_scale, k_cache.dtype)
        if vc4 is not None:
            vc4[o, i] = quantise_reference(v4[b, s], v_scale, v_cache.dtype)
