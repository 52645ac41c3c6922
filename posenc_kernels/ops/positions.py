"""Position resolution: which position (table row) token ``(b, s)`` uses. One home for every family.

A token's position comes from exactly one source, named the same way in every op:

* ``offset`` (int): ``offset + s``;
* ``offsets`` (``[B]`` tensor, per-sequence start positions): ``offsets[b] + s``;
* ``positions`` (``[B, S]`` or ``[S]``): ``positions[b, s]``;
* ``cu_seqlens`` (``[N + 1]``, packed varlen ``[T, ...]`` inputs): sequence ``n`` owns tokens
  ``cu_seqlens[n]:cu_seqlens[n + 1]`` and its positions restart at ``offsets[n]`` (or the int ``offset``);
  tokens past ``cu_seqlens[-1]`` (a padded graph bucket) take position 0.

:class:`PosMode` numbers these sources once; :func:`token_positions_tl` is the Triton helper every kernel
calls, :func:`token_positions` its torch twin (the torch backend and the references use it), and
``csrc/positions.h`` the C++ one. :func:`check_position_args` checks shapes and dtypes,
:func:`check_position_values` the values (a host sync on CUDA: skipped under graph capture or when value
checks are off, the kernels then give NaN for a row outside the table instead of reading out of bounds).
"""

from __future__ import annotations

import enum
from typing import Optional

import torch

from .checks import FLOAT_DTYPES, INT_DTYPES, check_tensor, value_checks_on
from .registry import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


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
    """Per-token positions ``[T]`` of a packed batch (int64; no host sync)."""
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(n_tokens, device=cu.device)
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


def check_position_values(
    positions, offsets, offset: int, *, seqlen: int, num_rows: Optional[int], device, cu_seqlens=None
) -> None:
    """Rows used must lie in ``[0, num_rows)`` (``num_rows`` None: no table, only cu_seqlens' own rules).
    Reads values (one host sync on CUDA), so it is skipped under graph capture and with value checks off."""
    if seqlen == 0:
        return
    if cu_seqlens is not None:
        if not value_checks_on(device):
            return
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        start = offsets.to(torch.int64) if offsets is not None else torch.full_like(lengths, offset)
        used = lengths > 0
        big = torch.iinfo(torch.int64).max
        lo = torch.where(used, start, big).min()
        hi = torch.where(used, start + lengths - 1, -big).max()
        first, last, decreasing, lo, hi = torch.stack((cu[0], cu[-1], (lengths < 0).any().long(), lo, hi)).tolist()
        if first != 0 or decreasing:
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu.tolist()[:16]}")
        if last > seqlen:
            raise ValueError(f"cu_seqlens[-1] = {last} exceeds the {seqlen} packed tokens of q")
        if num_rows is not None:
            if lo <= hi and (lo < 0 or hi >= num_rows):
                raise ValueError(
                    f"offsets + positions within each sequence must lie in [0, {num_rows}) (the table's rows), "
                    f"got rows in [{lo}, {hi}]"
                )
            if last < seqlen and num_rows < 1:
                raise ValueError("padded tokens past cu_seqlens[-1] use table row 0, but the table is empty")
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
