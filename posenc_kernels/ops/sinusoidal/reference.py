"""Sinusoidal references, written for clarity.

* ``*_reference``: the definition, in float64 (or a dtype you pass): the truth kernels are measured against.
* ``published_*``: the formulas as their sources write them (the Annotated Transformer, tensor2tensor,
  fairseq, diffusers), in fp32: the tolerance rule's "same computation done by torch" and the benchmarks'
  eager providers.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..positions import token_positions


def sinusoidal_table_reference(
    positions: torch.Tensor,
    dim: int,
    *,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The definition of ``sinusoidal_table`` for a tensor of positions, computed in ``dtype``."""
    half = dim // 2
    i = torch.arange(half, dtype=dtype, device=positions.device)
    inv_freq = torch.exp(-math.log(base) * i / (half - freq_shift)) if half else i
    angle = scale * (positions.to(dtype)[..., None] * inv_freq)
    first, second = (angle.cos(), angle.sin()) if cos_first else (angle.sin(), angle.cos())
    if interleaved:
        pe = torch.stack((first, second), dim=-1).flatten(-2)
    else:
        pe = torch.cat((first, second), dim=-1)
    if dim % 2:
        pe = torch.nn.functional.pad(pe, (0, 1))
    return pe


def _sinusoidal_positions(x3: torch.Tensor, positions, offsets) -> torch.Tensor:
    """Position of every token of ``x3`` ``[B, S, D]`` (positions, else offsets + s), rounded to fp32 (fp64
    for fp64 inputs) as the kernels and every published implementation do."""
    B, S = x3.shape[0], x3.shape[1]
    if isinstance(offsets, torch.Tensor):
        pos = token_positions(positions, offsets, 0, B, S, x3.device)
    else:
        pos = token_positions(positions, None, int(offsets), B, S, x3.device)
    return pos.to(torch.float64 if x3.dtype == torch.float64 else torch.float32)


def add_sinusoidal_reference(
    x: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    x_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    **convention,
) -> torch.Tensor:
    """The definition of ``add_sinusoidal``: ``x * x_scale + PE`` in ``dtype``; x is [B, S, D] or [T, D]."""
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    pos = _sinusoidal_positions(x3, positions, offsets)
    out = x3.to(dtype) * x_scale + sinusoidal_table_reference(pos, x3.shape[-1], dtype=dtype, **convention)
    return out.reshape(x.shape)


def concat_sinusoidal_reference(
    x: torch.Tensor,
    dim_pe: int,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    dtype: torch.dtype = torch.float64,
    **convention,
) -> torch.Tensor:
    """The definition of ``concat_sinusoidal``: ``[x | PE]`` in ``dtype``."""
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    pe = sinusoidal_table_reference(_sinusoidal_positions(x3, positions, offsets), dim_pe, dtype=dtype, **convention)
    return torch.cat((x3.to(dtype), pe), dim=-1).reshape(*x.shape[:-1], x.shape[-1] + dim_pe)


def published_transformer(length: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. 2017 as commonly written (the Annotated Transformer), fp32."""
    pe = torch.zeros(length, d_model)
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
    return pe


def published_tensor2tensor(length: int, channels: int, min_timescale=1.0, max_timescale=1.0e4, start_index=0):
    """tensor2tensor ``get_timing_signal_1d``, fp32, ``[length, channels]``."""
    position = torch.arange(length, dtype=torch.float32) + start_index
    num_timescales = channels // 2
    log_timescale_increment = math.log(float(max_timescale) / float(min_timescale)) / max(num_timescales - 1, 1)
    inv_timescales = min_timescale * torch.exp(torch.arange(num_timescales, dtype=torch.float32) * -log_timescale_increment)
    scaled_time = position[:, None] * inv_timescales[None, :]
    signal = torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)
    return torch.nn.functional.pad(signal, (0, channels % 2))


def published_fairseq(num_embeddings: int, embedding_dim: int) -> torch.Tensor:
    """fairseq ``SinusoidalPositionalEmbedding.get_embedding`` (no padding_idx), fp32."""
    half_dim = embedding_dim // 2
    emb = math.log(10000) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float) * -emb)
    emb = torch.arange(num_embeddings, dtype=torch.float).unsqueeze(1) * emb.unsqueeze(0)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1).view(num_embeddings, -1)
    if embedding_dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros(num_embeddings, 1)], dim=1)
    return emb


def published_diffusers(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """diffusers ``get_timestep_embedding``, fp32."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].float() * emb[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb
