"""flash-attn-style ``apply_rotary_emb`` (``flash_attn.layers.rotary.apply_rotary_emb``).

flash-attn's contract: ``x`` ``[B, S, H, D]``, or packed ``[T, H, D]`` with ``cu_seqlens`` ``[N + 1]``;
``cos``/``sin`` ``[seqlen_ro, rotary_dim / 2]``; the first ``rotary_dim <= D`` channels rotate, the rest pass
through; token ``s`` of sequence ``b`` reads row ``seqlen_offsets + s`` (an int, or a ``[B]`` tensor of
per-sequence offsets); ``interleaved`` pairs ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + rotary_dim/2)``
(GPT-NeoX); ``inplace`` writes into ``x`` and returns it. Differentiable w.r.t. ``x``.

Mapped onto :func:`posenc_kernels.apply_rope` / :func:`posenc_kernels.apply_rope_` directly (``k=None``).
Differences from flash-attn: tables of any float dtype are accepted (flash-attn requires x's dtype);
``max_seqlen`` is optional (flash-attn needs it only to size its grid) and, when given, is only
type-checked; a row past the table is an error raised before anything is written, where flash-attn's
kernel silently leaves such tokens unrotated (cos=1, sin=0) when ``seqlen_offsets`` is a tensor;
``x`` must have ``stride(-1) == 1`` (flash-attn takes any channel stride).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..ops.rope import apply_rope, apply_rope_

__all__ = ["apply_rotary_emb"]


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """flash-attn's ``apply_rotary_emb``: ``x`` rotated (``x`` itself when ``inplace``).

    >>> import torch
    >>> from posenc_kernels.integrations.flash_attn import apply_rotary_emb
    >>> angle = torch.arange(16.0)[:, None] * 0.1 ** torch.arange(4.0)  # [seqlen_ro, rotary_dim / 2]
    >>> x = torch.randn(2, 6, 3, 8)
    >>> y = apply_rotary_emb(x, angle.cos(), angle.sin(), seqlen_offsets=4)
    >>> y.shape, torch.equal(y, x)
    (torch.Size([2, 6, 3, 8]), False)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be None or an int >= 0, got {max_seqlen!r}")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, S, H, D] (or [T, H, D] with cu_seqlens), got shape {tuple(x.shape)}")
        kwargs = {}
    else:
        if x.dim() != 3:
            raise ValueError(f"x must be packed [T, H, D] when cu_seqlens is given, got shape {tuple(x.shape)}")
        kwargs = {"cu_seqlens": cu_seqlens}
    fn = apply_rope_ if inplace else apply_rope
    out, _ = fn(x, None, cos, sin, offsets=seqlen_offsets, interleaved=interleaved, **kwargs)
    return out
