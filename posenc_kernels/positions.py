"""Position-id builders: the index arithmetic that turns masks, padded tokens and packed-sequence offsets
into the positions the encodings of this package consume.

They are pure torch (a cumsum or a searchsorted is all they need; a kernel would not be faster than the
one pass torch already makes) and they never read a device value back to the host, so they can be captured
in a CUDA graph and traced by ``torch.compile(fullgraph=True)``. The only exception is documented:
``positions_from_cu_seqlens`` without ``total_tokens`` reads ``cu_seqlens[-1]``, and its value checks
(skipped while a CUDA graph is captured, while ``torch.compile`` traces, or after
``set_value_checks(False)``) read the offsets.

Each builder reproduces one published convention exactly:

=================================== ====================================================================
``position_ids_from_attention_mask`` Hugging Face ``GenerationMixin.prepare_inputs_for_generation``:
                                     ``mask.cumsum(-1) - 1``, padded slots set to 1, the last
                                     ``L - past_length`` columns kept.
``opt_positions``                    Hugging Face ``OPTLearnedPositionalEmbedding``:
                                     ``cumsum(mask) * mask - 1`` from ``past_length`` on, plus 2.
``fairseq_positions``                fairseq ``utils.make_positions``: real tokens numbered from
                                     ``padding_idx + 1``, padding tokens get ``padding_idx``.
``positions_from_cu_seqlens``        packed (varlen) batches: ``0, 1, ...`` restarting at every sequence
                                     start in ``cu_seqlens``, plus an optional per-sequence offset.
=================================== ====================================================================
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch

from .ops.checks import FLOAT_DTYPES, INT_DTYPES, check_tensor, on_cuda_graph_capture, value_checks_on

__all__ = [
    "position_ids_from_attention_mask",
    "opt_positions",
    "fairseq_positions",
    "positions_from_cu_seqlens",
]

_MASK_DTYPES = (torch.bool,) + INT_DTYPES + FLOAT_DTYPES

#: OPT's learned position table is offset by 2 (a fairseq legacy: padding_idx 1 plus one).
OPT_POSITION_OFFSET = 2


# ==============================================================================================
# Validation
# ==============================================================================================


def _as_int(name: str, value, *, minimum: int = 0) -> int:
    """A Python int (or anything with ``__index__``, SymInts included) >= ``minimum``; bools and floats
    are rejected so that ``past_length=1.0`` or ``True`` cannot slip through."""
    if isinstance(value, (bool, float)) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if as_int < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


def _check_mask(attention_mask, past_length) -> int:
    check_tensor("attention_mask", attention_mask, dtypes=_MASK_DTYPES, ndim=2)
    past_length = _as_int("past_length", past_length)
    length = attention_mask.shape[1]
    if past_length > length:
        raise ValueError(
            f"past_length ({past_length}) must be <= attention_mask.shape[1] ({length}): the mask covers the "
            "past tokens and the current ones"
        )
    return past_length


def _values_checked(device: torch.device) -> bool:
    """Whether checks that read tensor values may run now: they cost a device-to-host sync, so they are
    skipped while a CUDA graph is captured, while torch.compile traces, or when turned off."""
    return value_checks_on(device) and not torch.compiler.is_compiling()


# ==============================================================================================
# Public functions
# ==============================================================================================


def position_ids_from_attention_mask(attention_mask: torch.Tensor, *, past_length: int = 0) -> torch.Tensor:
    """Position ids of a padded batch, exactly as Hugging Face generation builds them.

    ``attention_mask`` ``[B, L]`` (bool, int or float, 1 = real token, 0 = padding) covers the ``past_length``
    tokens already in the KV cache followed by the current ones. Real tokens are numbered ``0, 1, ...`` in
    order (so left padding does not shift them); padded slots get 1. Returns the ``[B, L - past_length]``
    int64 ids of the current tokens: the ``position_ids`` that ``prepare_inputs_for_generation`` passes to
    the model, prefill (``past_length=0``) and every decode step (``past_length=L-1``) alike.

    No host sync; the mask's values are taken as given (anything nonzero counts as a real token).

    >>> import torch, posenc_kernels as pk
    >>> mask = torch.tensor([[0, 0, 1, 1, 1],
    ...                      [1, 1, 1, 1, 1]])
    >>> pk.position_ids_from_attention_mask(mask)
    tensor([[1, 1, 0, 1, 2],
            [0, 1, 2, 3, 4]])
    >>> step = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)  # one generated token
    >>> pk.position_ids_from_attention_mask(step, past_length=5)
    tensor([[3],
            [5]])
    """
    past_length = _check_mask(attention_mask, past_length)
    real = attention_mask != 0
    ids = real.cumsum(-1, dtype=torch.int64) - 1
    ids = ids.masked_fill(~real, 1)
    return ids[:, past_length:]


def opt_positions(attention_mask: torch.Tensor, *, past_length: int = 0) -> torch.Tensor:
    """Row indices into OPT's learned position table, exactly as Hugging Face ``OPTLearnedPositionalEmbedding``.

    ``attention_mask`` ``[B, L]`` covers past and current tokens. Real tokens get ``2 + (0, 1, ...)``
    (the table is offset by 2), padded slots get ``2 - 1 = 1``. Returns the ``[B, L - past_length]`` int64
    indices of the current tokens (index the ``num_embeddings + 2``-row table with them directly).

    >>> import torch, posenc_kernels as pk
    >>> mask = torch.tensor([[0, 1, 1, 1],
    ...                      [1, 1, 1, 0]])
    >>> pk.opt_positions(mask)
    tensor([[1, 2, 3, 4],
            [2, 3, 4, 1]])
    >>> pk.opt_positions(mask, past_length=3)
    tensor([[4],
            [1]])
    """
    past_length = _check_mask(attention_mask, past_length)
    real = attention_mask != 0
    ids = real.cumsum(-1, dtype=torch.int64) * real - 1
    return ids[:, past_length:] + OPT_POSITION_OFFSET


def fairseq_positions(tokens: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Positions of a padded token batch, exactly as fairseq ``utils.make_positions``.

    ``tokens`` ``[B, T]`` (integer ids). Non-padding tokens are numbered from ``padding_idx + 1`` in order,
    padding tokens get ``padding_idx`` (whose row of a fairseq position table is the zero/padding row).
    Returns int64 ``[B, T]``. No host sync.

    >>> import torch, posenc_kernels as pk
    >>> tokens = torch.tensor([[1, 1, 7, 8, 9],
    ...                        [5, 6, 7, 1, 1]])
    >>> pk.fairseq_positions(tokens, padding_idx=1)
    tensor([[1, 1, 2, 3, 4],
            [2, 3, 4, 1, 1]])
    """
    check_tensor("tokens", tokens, dtypes=INT_DTYPES, ndim=2)
    padding_idx = _as_int("padding_idx", padding_idx, minimum=-(1 << 62))
    real = tokens != padding_idx
    return real.cumsum(1, dtype=torch.int64) * real + padding_idx


def positions_from_cu_seqlens(
    cu_seqlens: torch.Tensor,
    total_tokens: Optional[int] = None,
    *,
    offsets: Union[int, torch.Tensor, None] = None,
) -> torch.Tensor:
    """Positions ``[T]`` of a packed (varlen) batch: ``0, 1, ...`` restarting at each sequence start.

    ``cu_seqlens`` ``[B + 1]`` (integer, as flash-attn's varlen API takes it) holds the cumulative sequence
    lengths: sequence ``b`` owns tokens ``cu_seqlens[b] : cu_seqlens[b + 1]``; it must start at 0 and never
    decrease (empty sequences are fine). ``offsets`` (an int, or ``[B]`` integer tensor: e.g. each
    sequence's KV-cache length during chunked prefill or decode) is added to every position of its sequence.

    ``total_tokens`` is the packed length ``T``. Pass it (you know it: it is the packed tensor's
    ``shape[0]``) to avoid reading ``cu_seqlens[-1]`` back to the host. The value checks below still read
    ``cu_seqlens`` once per call while they are on; with ``total_tokens`` given *and* the checks off
    (``set_value_checks(False)``, or automatically under CUDA-graph capture and torch.compile tracing) the
    call is sync-free. It may exceed ``cu_seqlens[-1]`` (a padded graph bucket): the trailing tokens
    belong to no sequence and get position 0. Returns int64 ``[T]`` on ``cu_seqlens``' device.

    Value checks (starts at 0, non-decreasing, ``total_tokens >= cu_seqlens[-1]``) read the tensor, so they
    run only outside CUDA-graph capture and torch.compile tracing, and while ``set_value_checks`` is on.

    >>> import torch, posenc_kernels as pk
    >>> cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    >>> pk.positions_from_cu_seqlens(cu)
    tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    >>> pk.positions_from_cu_seqlens(torch.tensor([0, 1, 2]), 2, offsets=torch.tensor([7, 4]))  # decode
    tensor([7, 4])
    """
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dtype == torch.bool:
        raise TypeError("cu_seqlens must be an integer tensor, got dtype torch.bool")
    check_tensor("cu_seqlens", cu_seqlens, dtypes=INT_DTYPES, ndim=1)
    if cu_seqlens.shape[0] == 0:
        raise ValueError("cu_seqlens must have B + 1 >= 1 entries (it starts with 0), got an empty tensor")
    device = cu_seqlens.device
    batch = cu_seqlens.shape[0] - 1
    offsets_t: Optional[torch.Tensor] = None
    offset = 0
    if isinstance(offsets, torch.Tensor):
        if offsets.dtype == torch.bool or offsets.dtype not in INT_DTYPES:
            raise TypeError(f"offsets must be an int or a [B] integer tensor, got dtype {offsets.dtype}")
        check_tensor("offsets", offsets, ndim=1, device=device)
        if offsets.shape[0] != batch:
            raise ValueError(
                f"offsets must have shape [B] = [{batch}] (one per sequence of cu_seqlens), got {tuple(offsets.shape)}"
            )
        offsets_t = offsets
    elif offsets is not None:
        offset = _as_int("offsets", offsets, minimum=-(1 << 62))

    check_values = _values_checked(device)
    if total_tokens is None:
        if on_cuda_graph_capture(device):
            raise ValueError("total_tokens is required while a CUDA graph is captured (cu_seqlens[-1] cannot be read)")
        total_tokens = int(cu_seqlens[-1])  # the one documented host read
        if total_tokens < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing from 0, but its last entry is {total_tokens}")
    else:
        total_tokens = _as_int("total_tokens", total_tokens)
    if check_values and cu_seqlens.numel():
        cu = cu_seqlens.to(torch.int64)
        first, decreasing, last = torch.stack([cu[0], (cu.diff() < 0).any().to(torch.int64), cu[-1]]).tolist()
        if first != 0:
            raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
        if decreasing:
            raise ValueError("cu_seqlens must be non-decreasing (cumulative sequence lengths)")
        if last > total_tokens:
            raise ValueError(
                f"total_tokens ({total_tokens}) must be >= cu_seqlens[-1] ({last}), the number of packed tokens"
            )

    tok = torch.arange(total_tokens, device=device, dtype=torch.int64)
    if batch == 0:
        return torch.zeros_like(tok)  # no sequence: every token is padding
    cu = cu_seqlens.to(torch.int64)
    # seq[t] = number of sequence ends <= t: the sequence that owns token t (== batch for trailing padding).
    seq = torch.searchsorted(cu[1:], tok, right=True)
    pos = tok - cu.gather(0, seq)
    if offsets_t is not None:
        pos = pos + offsets_t.to(torch.int64).gather(0, seq.clamp(max=batch - 1))
    elif offset:
        pos = pos + offset
    return pos.masked_fill(seq == batch, 0)
