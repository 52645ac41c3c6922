"""vLLM-style ``rotary_embedding``: in place on packed tokens, cos and sin in one cache, mapped onto
:func:`posenc_kernels.apply_rope_` without copies. The contract mirrored, and every difference from vLLM:
``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.checks import FLOAT_DTYPES, INT_DTYPES, check_tensor
from ..ops.rope import apply_rope_

__all__ = ["rotary_embedding"]


def _as_heads(name: str, x: torch.Tensor, lead: tuple[int, ...], head_size: int) -> torch.Tensor:
    """``x`` with ``lead`` leading dims, then ``[H*D]`` or ``[H, D]``, as a ``[*lead, H, D]`` view."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=(len(lead) + 1, len(lead) + 2))
    if tuple(x.shape[: len(lead)]) != lead:
        raise ValueError(f"{name} must have the leading dims of positions {list(lead)}, got shape {tuple(x.shape)}")
    if x.dim() == len(lead) + 2:
        if x.shape[-1] != head_size:
            raise ValueError(f"{name} is [..., H, D]: D must equal head_size={head_size}, got {tuple(x.shape)}")
        heads = x
    else:
        if x.shape[-1] % head_size:
            raise ValueError(
                f"{name}'s last dim must be a multiple of head_size={head_size} (H * head_size), got {x.shape[-1]}"
            )
        # A view whatever the channel stride; the kernel's launcher decides which strides it takes.
        heads = x.unflatten(-1, (x.shape[-1] // head_size, head_size))
    return heads if len(lead) == 2 else heads.unsqueeze(0)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: Optional[torch.Tensor],
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """vLLM's ``rotary_embedding``: rotate ``query`` and ``key`` in place; returns ``(query, key)``.

    ``positions`` ``[T]`` or ``[B, S]`` (integers), ``query`` ``[*positions.shape, Hq*D]`` or
    ``[*positions.shape, Hq, D]``, ``key`` the same with ``Hk`` heads or None, ``cos_sin_cache``
    ``[max_pos, rot_dim]`` = ``[cos | sin]``, ``rot_dim`` even and ``<= head_size``.

    >>> import torch
    >>> from posenc_kernels.integrations.vllm import rotary_embedding
    >>> angle = torch.arange(32.0)[:, None] * 0.1 ** torch.arange(4.0)
    >>> cache = torch.cat((angle.cos(), angle.sin()), dim=-1)  # [max_pos, rot_dim = 8]
    >>> q, k = torch.randn(5, 4 * 8), torch.randn(5, 2 * 8)
    >>> q_, k_ = rotary_embedding(torch.tensor([3, 0, 7, 7, 1]), q, k, 8, cache, True)
    >>> q_ is q
    True
    """
    check_tensor("positions", positions, ndim=(1, 2))
    if positions.dtype == torch.bool or positions.dtype not in INT_DTYPES:
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size must be a positive int, got {head_size!r}")
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, ndim=2, device=positions.device)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim == 0 or rot_dim % 2 or rot_dim > head_size:
        raise ValueError(
            f"cos_sin_cache must be [max_pos, rot_dim] with rot_dim even, in [2, head_size={head_size}], "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox must be a bool, got {type(is_neox).__name__}")
    lead = tuple(positions.shape)
    q4 = _as_heads("query", query, lead, head_size)
    k4 = _as_heads("key", key, lead, head_size) if key is not None else None
    half = rot_dim // 2
    cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
    apply_rope_(q4, k4, cos, sin, positions=positions, interleaved=not is_neox)
    return query, key
