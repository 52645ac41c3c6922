"""The position of every token, by definition: plain Python loops over tokens, written independently of
the package (nothing from ``posenc_kernels`` is imported here), so a bug in its position resolution
(``token_positions``, the kernels' position modes) cannot also be in the expected values.

* positions given: ``[B, S]`` (one per token) or ``[S]`` (shared by every sequence) -> those;
* ``offsets`` an int -> ``offsets + s``; ``offsets`` ``[B]`` -> ``offsets[b] + s``;
* packed (``cu_seqlens``): sequence ``n`` owns tokens ``cu[n]:cu[n + 1]`` and restarts at ``offsets[n]``
  (or the int ``offset``); tokens past ``cu[-1]`` take position 0;
* M-RoPE: frequency ``i`` takes its position from axis ``axis_map[i]`` of positions ``[A, B, S]``.

Results are nested lists of Python numbers; :func:`as_tensor` makes a tensor of them.
"""

from __future__ import annotations

import torch


def _values(v):
    """A tensor, list or number as nested Python lists / numbers."""
    return v.tolist() if isinstance(v, torch.Tensor) else v


def token_positions(batch: int, seqlen: int, *, positions=None, offsets=0) -> list:
    """``[B][S]``: the position of token ``s`` of sequence ``b``."""
    if positions is not None:
        pos = _values(positions)
        if len(pos) == seqlen and (not pos or not isinstance(pos[0], list)):  # [S]: every sequence alike
            return [list(pos) for _ in range(batch)]
        assert len(pos) == batch and all(len(row) == seqlen for row in pos), "positions must be [B, S] or [S]"
        return [list(row) for row in pos]
    offs = _values(offsets)
    if isinstance(offs, list):
        assert len(offs) == batch, "offsets must be an int or one per sequence"
        return [[offs[b] + s for s in range(seqlen)] for b in range(batch)]
    return [[offs + s for s in range(seqlen)] for _ in range(batch)]


def packed_positions(cu_seqlens, total: int, *, offsets=None, offset: int = 0) -> list:
    """``[T]``: positions of a packed batch of ``total`` tokens described by ``cu_seqlens``."""
    cu = _values(cu_seqlens)
    offs = _values(offsets)
    pos = [0] * total  # tokens past cu[-1] (padding of a bucket) take 0
    for n in range(len(cu) - 1):
        start = offs[n] if offs is not None else offset
        for t in range(cu[n], cu[n + 1]):
            pos[t] = start + (t - cu[n])
    return pos


def cu_positions(cu, offsets, offset, T, device=None) -> torch.Tensor:
    """:func:`packed_positions` as an int64 tensor (the helper's former signature in conftest.py)."""
    return torch.tensor(packed_positions(cu, T, offsets=offsets, offset=offset), dtype=torch.int64, device=device)


def axis_map(sections, *, interleaved: bool = False) -> list:
    """Which position axis each frequency follows. Sections ``[s0, s1, ...]``: contiguous (Qwen2-VL),
    ``s0`` frequencies on axis 0, then ``s1`` on axis 1, ...; interleaved (Qwen3-VL), frequency ``i`` on
    axis ``i % A`` while ``i < A * s_a`` for that axis ``a >= 1``, else on axis 0."""
    out = []
    if not interleaved:
        for a, n in enumerate(sections):
            out += [a] * n
        return out
    A = len(sections)
    for i in range(sum(sections)):
        a = i % A
        out.append(a if a >= 1 and i < A * sections[a] else 0)
    return out


def per_frequency_positions(axis_positions, axes) -> list:
    """``[B][S][R/2]``: for M-RoPE, frequency ``i`` of token (b, s) at ``axis_positions[axes[i]][b][s]``."""
    p = _values(axis_positions)
    axes = _values(axes)
    B, S = len(p[0]), len(p[0][0])
    return [[[p[a][b][s] for a in axes] for s in range(S)] for b in range(B)]


def as_tensor(values, device=None, dtype=None) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=dtype)
