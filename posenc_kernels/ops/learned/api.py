"""Learned absolute position embeddings (GPT-2 ``wpe``, BERT, OPT, ViT): the public functions and the
module. They coerce arguments and call the op pair (:mod:`.op`, which states the contract). Math in fp32
registers (fp64 with an fp64 operand); the table's gradient sums the rows of repeated positions (atomic
adds, or with ``deterministic`` a sorted, bitwise reproducible sum) and leaves ``padding_idx``'s row zero.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_tensor, split_offsets
from ..positions import check_position_args, token_positions
from .op import add_position_embedding as _op
from .op import norm_padding_idx

__all__ = ["add_position_embedding_", "add_position_embedding", "LearnedPositionEmbedding"]


def _resolve_deterministic(padding_idx, deterministic: Optional[bool]) -> bool:
    """``deterministic`` as the op takes it; ``padding_idx`` checked for what the schema's ``int?`` would hide
    (a bool is an int there)."""
    if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    return deterministic


def add_position_embedding_(
    x: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    *,
    padding_idx: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """In place ``x <- x + table[positions]`` in one pass (fused gather + add, fp32 math). Returns ``x``.

    ``x`` is ``[B, S, D]`` or ``[T, D]`` (any strides), ``table`` ``[P, D]`` of any
    float dtype, ``positions`` integer ``[B, S]`` or ``[S]`` (``[T]`` for 2-D x) in ``[0, P)``.
    Differentiable w.r.t. x and table (PyTorch's in-place rules apply to x). The table's gradient sums the
    gradient rows of repeated positions and leaves the ``padding_idx`` row zero; ``deterministic=True``
    (or None while ``torch.are_deterministic_algorithms_enabled()``) makes it bitwise reproducible.

    >>> import torch
    >>> from posenc_kernels import add_position_embedding_
    >>> x, table = torch.zeros(2, 3, 4), torch.randn(10, 4)
    >>> pos = torch.tensor([7, 0, 7])
    >>> y = add_position_embedding_(x, table, pos)
    >>> y is x, torch.equal(x[1, 2], table[7])
    (True, True)
    """
    _op.call_inplace(x, table, positions, padding_idx, _resolve_deterministic(padding_idx, deterministic))
    return x


def add_position_embedding(
    x: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    *,
    padding_idx: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Out-of-place twin of :func:`add_position_embedding_`: returns ``x + table[positions]``, x untouched.

    >>> import torch
    >>> from posenc_kernels import add_position_embedding
    >>> table = torch.randn(16, 8, requires_grad=True)
    >>> y = add_position_embedding(torch.randn(2, 5, 8), table, torch.arange(5), padding_idx=0)
    >>> y.sum().backward()
    >>> table.grad[0].abs().sum().item(), table.grad[1, 0].item(), table.grad[5:].abs().sum().item()
    (0.0, 2.0, 0.0)
    """
    return _op.call(x, table, positions, padding_idx, _resolve_deterministic(padding_idx, deterministic))


class LearnedPositionEmbedding(torch.nn.Module):
    """A learned ``[num_positions, dim]`` table (``weight``, initialised N(0, 0.02), the padding row zero);
    ``forward(x, positions)`` returns ``x + weight[positions]`` out of place, fused.

    ``positions`` defaults to ``0..S-1``. ``weight`` is named as nn.Embedding's, so GPT-2's ``wpe.weight``
    loads into it.

    >>> import torch
    >>> from posenc_kernels import LearnedPositionEmbedding
    >>> wpe = LearnedPositionEmbedding(1024, 16)
    >>> wpe(torch.randn(2, 7, 16)).shape
    torch.Size([2, 7, 16])
    >>> LearnedPositionEmbedding(8, 4, padding_idx=1).weight[1].abs().sum().item()
    0.0
    """

    def __init__(
        self,
        num_positions: int,
        dim: int,
        *,
        padding_idx: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        for name, v in (("num_positions", num_positions), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_positions, self.dim = num_positions, dim
        self.padding_idx = None if padding_idx is None else norm_padding_idx(padding_idx, num_positions)
        self.weight = torch.nn.Parameter(torch.empty(num_positions, dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=0.02)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, offsets=0) -> torch.Tensor:
        """``x + weight[positions]``; without positions, token ``(b, s)`` sits at ``offsets + s`` (an int, or
        a ``[B]`` tensor: decode passes the cache length, as with :class:`SinusoidalPositionalEncoding`)."""
        if positions is None:
            offsets_t, offset = split_offsets(offsets)
            if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
                check_tensor("x", x, ndim=(2, 3))
            x3 = x.unsqueeze(0) if x.dim() == 2 else x
            if offsets_t is not None:
                check_position_args(None, offsets_t, 0, batch=x3.shape[0], seqlen=x3.shape[1], device=x.device)
            positions = token_positions(None, offsets_t, offset, x3.shape[0], x3.shape[1], x.device)
            if offsets_t is None:
                positions = positions[0]  # one row for every sequence: [S]
        elif not (type(offsets) is int and offsets == 0):
            raise ValueError("pass positions or offsets, not both")
        return add_position_embedding(x, self.weight, positions, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_positions}, {self.dim}{pad}"
