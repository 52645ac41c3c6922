"""RoPE in pure torch (any device): the CPU path without the native extension, and the ``torch`` backend.
Same numerics as the kernels (angles from :mod:`..angles`); temporaries bounded by a chunk size."""

from __future__ import annotations

import torch

from ..angles import exact_angles, hf_angles
from ..positions import token_positions

_CHUNK_ELEMS = 1 << 21  # bounds the fp32 temporaries (8 MiB each)


def _angles(pos: torch.Tensor, a, acc: torch.dtype):
    """cos/sin ``[..., half]`` for positions ``pos`` ``[..., 1]`` (one axis) or ``[..., half]`` (per
    frequency axis), from the tables or on the fly."""
    if a.inv_freq is None:
        if pos.shape[-1] == 1:
            r = pos[..., 0]
            return a.cos[r].to(acc), a.sin[r].to(acc)
        col = torch.arange(a.cos.shape[-1], device=pos.device)
        return a.cos[pos, col].to(acc), a.sin[pos, col].to(acc)
    angle = exact_angles(pos, a.inv_freq) if a.exact else hf_angles(pos, a.inv_freq)
    return (angle.cos() * a.attention_factor).to(acc), (angle.sin() * a.attention_factor).to(acc)


def _rotate(x_in, x_out, rows, a) -> None:
    """Rotate ``x_in`` ``[B, S, H, D]`` into ``x_out`` (which may be ``x_in``) chunk by chunk along S.
    ``rows`` is ``[B, S]`` (or ``[A, B, S]`` with an axis map), possibly expanded."""
    B, S, H, D = x_in.shape
    half = (a.cos if a.inv_freq is None else a.inv_freq).shape[-1]
    R = 2 * half
    acc = torch.float64 if x_in.dtype == torch.float64 else torch.float32
    chunk = max(1, _CHUNK_ELEMS // max(1, B * H * R))
    shared_rows = rows.stride(-2) == 0  # same rows for every sequence: build cos/sin once
    axis = a.axis_map.to(device=rows.device, dtype=torch.int64) if a.axis_map is not None else None
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[..., :1, s0:s1] if shared_rows else rows[..., s0:s1]
        pos = r[axis].permute(1, 2, 0) if axis is not None else r[..., None]  # [b, s, half or 1]
        c, sn = _angles(pos, a, acc)
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


def _rows(a, B: int, S: int, device) -> torch.Tensor:
    if a.axis_map is not None:
        p = a.positions.to(torch.int64)
        return p[:, None, :].expand(-1, B, S) if p.dim() == 2 else p
    return token_positions(a.positions, a.offsets, a.offset, B, S, device, a.cu_seqlens)


def rope_torch(q, k, q_out, k_out, a) -> None:
    """Rotate 4-D ``q``/``k`` into ``q_out``/``k_out`` (which may be q/k)."""
    if q.shape[0] * q.shape[1] == 0:
        return
    rows = _rows(a, q.shape[0], q.shape[1], q.device)
    _rotate(q, q_out, rows, a)
    if k is not None:
        _rotate(k, k_out, rows, a)


def cos_sin_torch(positions, inv_freq, attention_factor, cos, sin) -> None:
    angle = hf_angles(positions.reshape(-1, 1), inv_freq[None, :])
    cos.view(-1, inv_freq.shape[0]).copy_(angle.cos() * attention_factor)
    sin.view(-1, inv_freq.shape[0]).copy_(angle.sin() * attention_factor)
