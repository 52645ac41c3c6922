"""QK-norm + RoPE references, written for clarity.

* :func:`rms_norm_reference` / :func:`qk_norm_rope_reference`: the definition, in float64 (or a dtype you
  pass): RMSNorm ``x * rsqrt(mean(x**2) + eps) * (weight_offset + w)`` over each head (``norm="head"``) or
  over all heads of a token (``norm="heads"``), then RoPE on the first ``R`` channels.
* :func:`qk_norm_rope_hf_eager`: what HF transformers runs today (Qwen3's ``q_norm``/``k_norm`` then
  ``apply_rotary_pos_emb``), in the input dtype: the tolerance rule's "same computation done by torch" and
  the eager benchmark provider.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..rope.reference import rope_hf_eager, rope_reference


def rms_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    norm: str = "head",
    weight_offset: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """RMSNorm of ``x`` ``[..., H, D]`` in ``dtype``: over ``D`` (``"head"``, weight ``[D]``) or over ``H*D``
    (``"heads"``, weight ``[H*D]``); a weight of None scales by 1."""
    x = x.to(dtype)
    H, D = x.shape[-2], x.shape[-1]
    dims = (-1,) if norm == "head" else (-2, -1)
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        w = weight.to(dtype)
        y = y * (weight_offset + (w if norm == "head" else w.view(H, D)))
    return y


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm: str = "head",
    weight_offset: float = 0.0,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """The definition of ``qk_norm_rope``: q/k ``[B, S, H, D]`` normalised then rotated, in ``dtype``."""
    kw = dict(eps=eps, norm=norm, weight_offset=weight_offset, dtype=dtype)
    qn = rms_norm_reference(q, q_weight, **kw)
    kn = rms_norm_reference(k, k_weight, **kw) if k is not None else None
    return rope_reference(qn, kn, cos, sin, positions=positions, offsets=offsets, interleaved=interleaved, dtype=dtype)


def hf_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6, weight_offset: float = 0.0):
    """HF's ``Qwen3RMSNorm`` (Gemma's ``(1 + w)`` with ``weight_offset=1``): fp32 statistics, the normalised
    value cast back to the input dtype, then scaled by the weight in the input dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return h.to(dtype)
    return (weight_offset + weight) * h.to(dtype) if weight_offset == 0.0 else (h * (weight_offset + weight.float())).to(dtype)


def qk_norm_rope_hf_eager(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm: str = "head",
    weight_offset: float = 0.0,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
):
    """HF eager: RMSNorm per head (or over the flattened heads) in the input dtype, then HF's RoPE."""

    def norm_one(x, w):
        if norm == "head":
            return hf_rms_norm(x, w, eps, weight_offset)
        return hf_rms_norm(x.flatten(-2), w, eps, weight_offset).view(x.shape)

    qn = norm_one(q, q_weight)
    kn = norm_one(k, k_weight) if k is not None else None
    return rope_hf_eager(qn, kn, cos, sin, positions=positions, offsets=offsets, interleaved=interleaved)
