"""Learned position embedding references, written for clarity: the definition in float64 (or a dtype you
pass; differentiable for the reference gradients), the table gradient as a formula, and
``position_embedding_eager`` (as models write it: the benchmarks' eager provider).
"""

from __future__ import annotations

from typing import Optional

import torch


def add_position_embedding_reference(
    x: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    *,
    padding_idx: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``x + table[positions]`` computed and returned in ``dtype``. x is ``[B, S, D]`` or ``[T, D]``;
    positions ``[B, S]``, ``[S]`` or ``[T]`` (broadcast over the batch). Differentiable in x and table, with
    nn.Embedding's gradient rule (repeated positions summed, the ``padding_idx`` row gets none)."""
    emb = torch.nn.functional.embedding(positions.to(torch.int64), table.to(dtype), padding_idx=padding_idx)
    return x.to(dtype) + emb


def position_embedding_grad_reference(
    grad: torch.Tensor,
    positions: torch.Tensor,
    num_rows: int,
    *,
    padding_idx: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The table gradient ``[num_rows, D]`` in ``dtype``: ``out[r] = sum of grad[b, s] over tokens with
    positions[b, s] == r``, zero for ``padding_idx``. Accumulated in ``dtype`` in token order."""
    D = grad.shape[-1]
    rows = positions.to(torch.int64).expand(grad.shape[:-1]).reshape(-1)
    out = torch.zeros(num_rows, D, dtype=dtype, device=grad.device)
    out.index_add_(0, rows, grad.reshape(-1, D).to(dtype))
    if padding_idx is not None:
        out[padding_idx] = 0
    return out


def position_embedding_eager(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """How models write it (GPT-2's ``inputs_embeds + wpe(position_ids)``): a gathered ``[.., S, D]``
    temporary, then an add, in the input dtypes (PyTorch's type promotion when they differ)."""
    return x + table[positions]
