"""RoPE frequency schedules: the inverse frequencies (and attention factor) of every HF rope type.

Everything is computed in float64 and rounded once to the requested dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["rope_frequencies"]


def rope_frequencies(
    rotary_dim: int,
    base: float = 10000.0,
    *,
    scaling: Optional[dict] = None,
    seq_len: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)``: inverse frequencies ``base ** (-2i / rotary_dim)`` for
    ``i < rotary_dim / 2`` as ``dtype`` (fp32 by default; float64 for ``exact`` on-the-fly angles), and
    the factor cos/sin are scaled by.

    Computed in float64 and rounded once, so every entry is the value nearest the exact one.

    >>> import posenc_kernels as pk
    >>> inv_freq, attention_factor = pk.rope_frequencies(8)
    >>> inv_freq, attention_factor
    (tensor([1.0000, 0.1000, 0.0100, 0.0010]), 1.0)
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even int (channels rotate in pairs), got {rotary_dim}")
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    if scaling is not None:
        raise NotImplementedError("scaling schedules land with issue 3")
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return (float(base) ** -exponent).to(dtype), 1.0
