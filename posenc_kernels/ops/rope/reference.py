"""RoPE references, written for clarity.

* ``*_reference``: the definition, in float64 (or a dtype you pass): the truth kernels are measured against.
* ``rope_hf_eager``, ``hf_apply_rotary_pos_emb``, ``rotate_half`` (and GPT-J's): RoPE as HF transformers
  writes it, in the input dtype: the tolerance rule's "same computation done by torch", the eager
  benchmark provider and ``integrations.hf``'s fallback; ``vllm_rope_native``: vLLM's ``forward_native``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..positions import token_positions


def _rows(positions, offsets, batch: int, seqlen: int, device) -> torch.Tensor:
    """Table row of every token, ``[B, S]`` int64 (``offsets`` an int or a ``[B]`` tensor)."""
    if isinstance(offsets, torch.Tensor):
        return token_positions(positions, offsets, 0, batch, seqlen, device)
    return token_positions(positions, None, int(offsets), batch, seqlen, device)


def rope_frequencies_reference(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """float64 ``base ** (-2i / rotary_dim)``."""
    return float(base) ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def rope_cos_sin_reference(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0):
    """float64 cos/sin of ``pos * inv_freq`` (positions and inv_freq taken exactly as given)."""
    angle = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    return angle.cos() * attention_factor, angle.sin() * attention_factor


def rotate_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    *,
    interleaved: bool = False,
    conjugate: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, D]``: pair (a, b) of token (b, s) -> (a cos - b sin, b cos + a sin) with the
    angle of table row ``rows[b, s]``; computed in ``dtype`` and returned in ``dtype``."""
    half = cos.shape[-1]
    R = 2 * half
    c = cos.to(dtype)[rows][:, :, None, :]  # [B, S, 1, R/2]
    s = sin.to(dtype)[rows][:, :, None, :]
    if conjugate:
        s = -s
    x = x.to(dtype)
    rot, rest = x[..., :R], x[..., R:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((out, rest), dim=-1)


def rotate_by_angles_reference(x, angle, attention_factor: float = 1.0, *, interleaved: bool = False,
                               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, D]`` by per-token angles ``angle`` ``[B, S, R/2]`` (cos/sin scaled by
    ``attention_factor``): :func:`rotate_reference` with a one-row-per-token table."""
    B, S, half = angle.shape
    a = angle.to(dtype)
    rows = torch.arange(B * S, device=x.device).view(B, S)
    cos = (a.cos() * attention_factor).reshape(B * S, half)
    sin = (a.sin() * attention_factor).reshape(B * S, half)
    return rotate_reference(x, cos, sin, rows, interleaved=interleaved, dtype=dtype)


def rope_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
    conjugate: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """The definition of ``apply_rope``: returns (q, k) rotated, in ``dtype`` (float64 by default)."""
    rows = _rows(positions, offsets, q.shape[0], q.shape[1], q.device)
    kw = dict(interleaved=interleaved, conjugate=conjugate, dtype=dtype)
    q_out = rotate_reference(q, cos, sin, rows, **kw)
    k_out = rotate_reference(k, cos, sin, rows, **kw) if k is not None else None
    return q_out, k_out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF transformers' helper: [x1, x2] -> [-x2, x1]."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's helper (HF ``modeling_gptj``): pairs (2i, 2i+1) -> (-x[2i+1], x[2i])."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF transformers' ``apply_rotary_pos_emb``: q/k ``[B, H, S, D]`` (``unsqueeze_dim=1``) or
    ``[B, S, H, D]`` (``2``), cos/sin ``[B, S, R]`` (the half table duplicated, gathered per token); the
    first ``R`` channels rotate, the rest pass through (partial rotary); ``k`` may be None."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    def one(x):
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        out = (x_rot * cos) + (rotate_half(x_rot) * sin)
        return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out

    return one(q), (one(k) if k is not None else None)


def hf_gptj_apply_rotary_pos_emb(tensor, sin, cos):
    """HF GPT-J's ``apply_rotary_pos_emb(tensor, sin, cos)``: ``tensor`` ``[B, S, H, R]``, sin/cos
    ``[B, S, R/2]``, interleaved pairs."""
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return (tensor * cos) + (rotate_every_two(tensor) * sin)


def rope_hf_eager(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
):
    """RoPE as HF transformers computes it: tables gathered and duplicated to ``[B, S, 1, R]`` in the
    input dtype, then ``x * cos + rotate_half(x) * sin`` in the input dtype (GPT-J's ``rotate_every_two``
    for interleaved pairs); pass-through channels concatenated back. Out of place."""
    rows = _rows(positions, offsets, q.shape[0], q.shape[1], q.device)
    R = 2 * cos.shape[-1]

    def one(x):
        c, s = cos[rows].to(x.dtype), sin[rows].to(x.dtype)  # [B, S, R/2]
        if interleaved:
            return torch.cat((hf_gptj_apply_rotary_pos_emb(x[..., :R], s, c), x[..., R:]), dim=-1)
        return hf_apply_rotary_pos_emb(x, None, torch.cat((c, c), -1), torch.cat((s, s), -1), unsqueeze_dim=2)[0]

    return one(q), (one(k) if k is not None else None)


def vllm_rope_native(positions, query, key, cos_sin_cache, head_dim, is_neox_style=True):
    """vLLM's ``RotaryEmbedding.forward_native``: ``positions`` ``[T]`` (or ``[B, S]``), query/key
    ``[T, H * D]`` (or ``[T, H, D]``; key may be None); the cache rows ``[cos | sin]``, ``[max_pos,
    rotary_dim]``, are gathered inside the call. Partial rotary (``rotary_dim < head_dim``, vLLM's
    ``rotary_dim`` is the cache's width) rotates the first ``rotary_dim`` channels of each head and passes the
    rest through; ``is_neox_style`` pairs ``(i, i + rotary_dim/2)``, else ``(2i, 2i + 1)``. Out of place."""
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions.flatten()).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2).to(query.dtype), sin.unsqueeze(-2).to(query.dtype)

    def rotate(x):
        shape = x.shape
        x = x.reshape(positions.numel(), -1, head_dim)
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        if is_neox_style:
            x1, x2 = torch.chunk(x_rot, 2, dim=-1)
            rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
            rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rot, x_pass), dim=-1).reshape(shape)

    return rotate(query), (rotate(key) if key is not None else None)
