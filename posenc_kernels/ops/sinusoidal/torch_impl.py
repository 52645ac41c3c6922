"""Sinusoidal encodings in pure torch (any device): the CPU path without the native extension, and the
``torch`` backend. Same numerics as the kernel; temporaries bounded by a chunk size."""

from __future__ import annotations

import functools
import math

import torch

from ..positions import token_positions

_CHUNK_ELEMS = 1 << 21


@functools.lru_cache(maxsize=64)
def sinusoidal_inv_freq(half: int, base: float, freq_shift: float, device: torch.device, dtype: torch.dtype):
    """``base ** (-i / (half - freq_shift))`` computed in float64, rounded once to ``dtype``, cached per
    device; ``csrc/bindings.cpp``'s ``sinusoidal_inv_freq`` computes the same values."""
    i = torch.arange(half, dtype=torch.float64)
    return torch.exp(-math.log(base) * i / (half - freq_shift)).to(device=device, dtype=dtype)


def sinusoidal_torch(x, out, positions, offsets, offset, x_scale, inv_freq, scale, interleaved, cos_first) -> None:
    """Writes PE (x None) or x * x_scale + PE into ``out`` ``[B, S, D]`` (any strides; ``out`` may be
    ``x``), chunked along S; once per chunk when every sequence uses the same positions."""
    B, S, D = out.shape
    if B * S == 0:
        return
    half = D // 2
    rows = token_positions(positions, offsets, offset, B, S, out.device)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    shared_rows = rows.stride(0) == 0
    chunk = max(1, _CHUNK_ELEMS // max(1, (1 if shared_rows else B) * D))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[:1, s0:s1] if shared_rows else rows[:, s0:s1]
        angle = (r.to(inv_freq.dtype)[..., None] * inv_freq) * scale
        sn, cs = angle.sin(), angle.cos()
        first, second = (cs, sn) if cos_first else (sn, cs)
        pe = torch.stack((first, second), dim=-1).flatten(-2) if interleaved else torch.cat((first, second), -1)
        if D > 2 * half:
            pe = torch.nn.functional.pad(pe, (0, D - 2 * half))
        pe = pe.to(acc)
        if x is None:
            out[:, s0:s1].copy_(pe)
        elif x.dtype == acc:  # one pointwise pass, writing straight into out (which may be x)
            torch.add(pe, x[:, s0:s1], alpha=x_scale, out=out[:, s0:s1])
        else:
            out[:, s0:s1].copy_(torch.add(pe, x[:, s0:s1].to(acc), alpha=x_scale))
