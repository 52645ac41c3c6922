"""Positions, one home: which position (table row) token ``(b, s)`` uses, in every family and backend, and
the public builders that turn masks, padded tokens and packed-sequence offsets into positions.

A token's position comes from exactly one source, named the same way in every op:

* ``offset`` (int): ``offset + s``;
* ``offsets`` (``[B]`` tensor, per-sequence start positions): ``offsets[b] + s``;
* ``positions`` (``[B, S]`` or ``[S]``): ``positions[b, s]``;
* ``cu_seqlens`` (``[N + 1]``, packed varlen ``[T, ...]`` inputs): sequence ``n`` owns tokens
  ``cu_seqlens[n]:cu_seqlens[n + 1]`` and its positions restart at ``offsets[n]`` (or the int ``offset``);
  tokens past ``cu_seqlens[-1]`` (a padded graph bucket) take position 0.

:class:`PosMode` numbers these sources once; :func:`token_positions_tl` is the Triton helper every kernel
calls, :func:`token_positions` its torch twin, and ``csrc/positions.h`` the C++ one.
:func:`check_position_args` checks shapes and dtypes, :func:`check_position_values` the values (a host sync
on CUDA: skipped when :func:`~posenc_kernels.ops.checks.value_checks_on` says so; the kernels then give NaN
for a row outside the table instead of reading out of bounds).

The public builders (``position_ids_from_attention_mask``, ``opt_positions``, ``fairseq_positions``,
``positions_from_cu_seqlens``) each reproduce one published convention exactly; they are pure torch and
never read a device value back to the host (one documented exception), so CUDA graphs and
``torch.compile(fullgraph=True)`` take them.
"""

from __future__ import annotations

import enum
import operator
from typing import Optional, Union

import torch

from .checks import FLOAT_DTYPES, INT_DTYPES, check_tensor, on_cuda_graph_capture, value_checks_on
from .registry import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["position_ids_from_attention_mask", "opt_positions", "fairseq_positions", "positions_from_cu_seqlens"]


class PosMode(enum.IntEnum):
    OFFSET = 0  # row = offset + s
    OFFSETS = 1  # row = offsets[b] + s
    POSITIONS = 2  # row = positions[b, s]
    CU_SEQLENS = 3  # packed varlen: row = (offsets[n] or offset) + t - cu_seqlens[n]


def pos_mode(positions, offsets, cu_seqlens) -> PosMode:
    if cu_seqlens is not None:
        return PosMode.CU_SEQLENS
    if positions is not None:
        return PosMode.POSITIONS
    return PosMode.OFFSETS if offsets is not None else PosMode.OFFSET


def launch_args(positions, offsets, offset, cu_seqlens):
    """What :func:`token_positions_tl` takes: ``(mode, pos, stride_pos_b, stride_pos_s, offsets,
    stride_off, offset, n_seqs, cu_block, seq_offsets)`` (``pos`` is positions or cu_seqlens;
    ``cu_block``: sequences the varlen search reads at a time, a power of two in [16, 256])."""
    mode = pos_mode(positions, offsets, cu_seqlens)
    pos, spb, sps, n_seqs, cu_block = None, 0, 0, 0, 16
    if mode == PosMode.CU_SEQLENS:
        pos, sps = cu_seqlens, cu_seqlens.stride(0)
        n_seqs = cu_seqlens.shape[0] - 1
        cu_block = min(256, max(16, 1 << max(0, n_seqs - 1).bit_length()))
    elif mode == PosMode.POSITIONS:
        pos = positions
        spb = positions.stride(0) if positions.dim() == 2 else 0
        sps = positions.stride(-1)
    soff = offsets.stride(0) if offsets is not None else 0
    return int(mode), pos, spb, sps, offsets, soff, int(offset), n_seqs, cu_block, offsets is not None


if HAS_TRITON:

    @triton.jit
    def token_positions_tl(
        b, s, tok_mask, pos_ptr, stride_pos_b, stride_pos_s, off_ptr, stride_off, offset, n_seqs,
        CU_BLOCK: tl.constexpr, MODE: tl.constexpr, SEQ_OFFSETS: tl.constexpr,
    ):  # fmt: skip
        """Position of tokens ``(b, s)`` (``s`` a ``[BLOCK]`` vector, ``b`` a scalar), in the dtype of its
        source (int64 for offsets; positions as stored, floats included). With cu_seqlens ``b`` is 0 and
        ``s`` the packed token index; its sequence is the last ``n`` with ``cu[n] <= s``. cu (and the
        per-sequence offsets) are read ``CU_BLOCK`` sequences at a time, and ``n``, ``cu[n]`` and ``offsets[n]``
        selected in registers: up to 256 sequences, no load waits on another (a binary search would wait through
        log2(N) of them one after another)."""
        if MODE == 0:
            pos = s + offset
        elif MODE == 1:
            pos = tl.load(off_ptr + b * stride_off).to(tl.int64) + s
        elif MODE == 2:
            pos = tl.load(pos_ptr + b * stride_pos_b + s * stride_pos_s, mask=tok_mask, other=0)
        else:
            end = tl.load(pos_ptr + n_seqs * stride_pos_s)  # converted only at the end: not waited on early
            # cu[0] = 0 <= s (checked), so every token finds a sequence; the defaults only serve unchecked input
            start = tl.zeros_like(s).to(tl.int64)
            base = tl.zeros_like(s).to(tl.int64) + offset
            j0 = n_seqs * 0
            while j0 < n_seqs:  # while: Triton 3.6's interpreter cannot range() over int arguments
                j = j0 + tl.arange(0, CU_BLOCK)
                jm = j < n_seqs
                cu_j = tl.load(pos_ptr + j * stride_pos_s, mask=jm, other=0)
                if SEQ_OFFSETS:
                    off_j = tl.load(off_ptr + j * stride_off, mask=jm, other=0)
                last = tl.max(tl.where(jm[None, :] & (cu_j[None, :] <= s[:, None]), j[None, :], -1), axis=1)
                pick = j[None, :] == last[:, None]
                hit = last >= 0
                start = tl.where(hit, tl.sum(tl.where(pick, cu_j[None, :], 0), axis=1).to(tl.int64), start)
                if SEQ_OFFSETS:
                    base = tl.where(hit, tl.sum(tl.where(pick, off_j[None, :], 0), axis=1).to(tl.int64), base)
                j0 += CU_BLOCK
            pos = tl.where(s < end, s - start + base, 0)
        return pos


def cu_seqlens_positions(cu_seqlens: torch.Tensor, offsets: Optional[torch.Tensor], offset: int, n_tokens: int):
    """Per-token positions ``[T]`` of a packed batch (int64; no host sync): the torch twin of the kernels'
    varlen mode, and what :func:`positions_from_cu_seqlens` returns."""
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(n_tokens, device=cu.device)
    if cu.shape[0] < 2:
        return torch.zeros_like(t)  # no sequence: every token is padding
    seq = torch.searchsorted(cu[1:], t, right=True).clamp_(max=cu.shape[0] - 2)
    base = offsets.to(torch.int64)[seq] if offsets is not None else offset
    return torch.where(t < cu[-1], t - cu[seq] + base, 0)


def token_positions(positions, offsets, offset: int, batch: int, seqlen: int, device, cu_seqlens=None) -> torch.Tensor:
    """The position of every token as a ``[B, S]`` tensor (int64, or the positions' float dtype; maybe an
    expanded view): the torch twin of :func:`token_positions_tl`."""
    if cu_seqlens is not None:
        return cu_seqlens_positions(cu_seqlens, offsets, offset, seqlen)[None, :].expand(batch, seqlen)
    if positions is not None:
        if positions.dtype.is_floating_point:
            return positions.expand(batch, seqlen)
        return positions.to(torch.int64).expand(batch, seqlen)
    s = torch.arange(seqlen, device=device, dtype=torch.int64)
    if offsets is not None:
        return offsets.to(torch.int64)[:, None] + s[None, :]
    return (s + offset)[None, :].expand(batch, seqlen)


def _int_tensor(name: str, t, *, ndim, device) -> None:
    if isinstance(t, torch.Tensor) and (t.dtype == torch.bool or t.dtype not in INT_DTYPES):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    check_tensor(name, t, ndim=ndim, device=device)


def check_position_args(
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    *,
    batch: int,
    seqlen: int,
    device: torch.device,
    cu_seqlens: Optional[torch.Tensor] = None,
    packed: bool = False,
    integer_positions: bool = True,
) -> None:
    """Shape/dtype checks of the position source, shared by every op that resolves a row per token."""
    if cu_seqlens is not None:
        if not packed:
            raise ValueError("cu_seqlens needs packed inputs [T, ...] (tokens of all sequences back to back)")
        _int_tensor("cu_seqlens", cu_seqlens, ndim=1, device=device)
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be [N + 1] with N >= 1 sequences, got shape {tuple(cu_seqlens.shape)}")
        if positions is not None:
            raise ValueError("pass positions or cu_seqlens, not both")
        batch = cu_seqlens.shape[0] - 1
    if positions is not None:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor or None, got {type(positions).__name__}")
        dtypes = INT_DTYPES if integer_positions else INT_DTYPES + FLOAT_DTYPES
        if positions.dtype == torch.bool or positions.dtype not in dtypes:
            kind = "an integer" if integer_positions else "an integer or floating"
            raise TypeError(f"positions must be {kind} tensor, got dtype {positions.dtype}")
        check_tensor("positions", positions, ndim=(1, 2), device=device)
        if tuple(positions.shape) not in [(seqlen,), (batch, seqlen)]:
            raise ValueError(
                f"positions must have shape [S] = [{seqlen}] or [B, S] = [{batch}, {seqlen}], got {tuple(positions.shape)}"
            )
        if offsets is not None or offset != 0:
            raise ValueError("pass positions or offsets, not both")
    if offsets is not None:
        if offsets.dtype == torch.bool or offsets.dtype not in INT_DTYPES:
            raise TypeError(f"offsets must be an int or an integer tensor, got dtype {offsets.dtype}")
        check_tensor("offsets", offsets, ndim=1, device=device)
        if offsets.shape[0] != batch:
            raise ValueError(f"offsets must have shape [B] = [{batch}], got {tuple(offsets.shape)}")
        if offset != 0:
            raise ValueError(f"offset must be 0 when an offsets tensor is given, got {offset}")


def check_cu_seqlens_values(cu_seqlens, n_tokens: int, tokens: str, offsets=None, offset: int = 0,
                            num_rows: Optional[int] = None) -> None:  # fmt: skip
    """``cu_seqlens`` starts at 0, never decreases and ends at most at ``n_tokens`` (named ``tokens`` in the
    message); with ``num_rows``, every row a sequence uses lies in ``[0, num_rows)``. One host read."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    start = offsets.to(torch.int64) if offsets is not None else torch.full_like(lengths, offset)
    used = lengths > 0
    big = torch.iinfo(torch.int64).max
    lo = torch.where(used, start, big).amin() if used.numel() else cu.new_tensor(big)
    hi = torch.where(used, start + lengths - 1, -big).amax() if used.numel() else cu.new_tensor(-big)
    first, last, decreasing, lo, hi = torch.stack((cu[0], cu[-1], (lengths < 0).any().long(), lo, hi)).tolist()
    if first != 0 or decreasing:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu.tolist()[:16]}")
    if last > n_tokens:
        raise ValueError(f"cu_seqlens[-1] = {last} exceeds {tokens}")
    if num_rows is not None:
        if lo <= hi and (lo < 0 or hi >= num_rows):
            raise ValueError(
                f"offsets + positions within each sequence must lie in [0, {num_rows}) (the table's rows), "
                f"got rows in [{lo}, {hi}]"
            )
        if last < n_tokens and num_rows < 1:
            raise ValueError("padded tokens past cu_seqlens[-1] use table row 0, but the table is empty")


def check_position_values(
    positions, offsets, offset: int, *, seqlen: int, num_rows: Optional[int], device, cu_seqlens=None
) -> None:
    """Rows used must lie in ``[0, num_rows)`` (``num_rows`` None: no table, only cu_seqlens' own rules).
    Reads values (one host sync on CUDA), so it is skipped under graph capture and with value checks off."""
    if seqlen == 0:
        return
    if cu_seqlens is not None:
        if value_checks_on(device):
            check_cu_seqlens_values(cu_seqlens, seqlen, f"the {seqlen} packed tokens of q", offsets, offset, num_rows)
        return
    if num_rows is None:
        return
    if positions is None and offsets is None:
        if offset < 0 or offset + seqlen > num_rows:
            raise ValueError(
                f"offsets={offset} with seqlen {seqlen} needs table rows [{offset}, {offset + seqlen}), "
                f"but the cos/sin table has {num_rows} rows"
            )
        return
    if not value_checks_on(device):
        return
    t = positions if positions is not None else offsets
    if t.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(t.to(torch.int64)))
    if positions is not None:
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"positions must lie in [0, {num_rows}) (the table's rows), got values in [{lo}, {hi}]")
    elif lo < 0 or hi + seqlen > num_rows:
        raise ValueError(
            f"offsets + seqlen must stay within the table's {num_rows} rows: offsets lie in [{lo}, {hi}] "
            f"and seqlen is {seqlen}"
        )


_MASK_DTYPES = (torch.bool,) + INT_DTYPES + FLOAT_DTYPES

#: OPT's learned position table is offset by 2 (a fairseq legacy: padding_idx 1 plus one).
OPT_POSITION_OFFSET = 2


# ----------------------------------------------------------------------------------------------
# The public builders
# ----------------------------------------------------------------------------------------------


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

    if total_tokens is None:
        if on_cuda_graph_capture(device):
            raise ValueError("total_tokens is required while a CUDA graph is captured (cu_seqlens[-1] cannot be read)")
        total_tokens = int(cu_seqlens[-1])  # the one documented host read
        if total_tokens < 0:
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, but its last entry is {total_tokens}")
    else:
        total_tokens = _as_int("total_tokens", total_tokens)
    if value_checks_on(device):
        check_cu_seqlens_values(cu_seqlens, total_tokens, f"total_tokens = {total_tokens}")
    return cu_seqlens_positions(cu_seqlens, offsets_t, offset, total_tokens)
