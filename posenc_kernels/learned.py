"""Learned absolute position embeddings (GPT-2 ``wpe``, BERT, OPT, ViT): the fused ``x + table[positions]``.

Read top-down: Triton kernels -> pure-torch implementation -> validation and launchers -> torch.library
ops (fake + autograd) -> public functions -> nn.Module.

Contract:

* ``x`` is ``[B, S, D]`` or ``[T, D]`` with any strides as long as ``stride(-1) == 1``; ``table`` is
  ``[P, D]`` of any float dtype (it may differ from x's; any strides); ``positions`` is an integer tensor
  ``[B, S]`` or ``[S]`` (``[T]`` for 2-D x) with values in ``[0, P)``.
* Forward: one pass, ``x[b, s] + table[positions[b, s]]`` gathered and added in fp32 registers (fp64 when
  x or the table is fp64), cast to x's dtype on store. A row outside the table (reachable only with value
  checks off, see ``set_value_checks``) reads as NaN: the kernels never read out of bounds.
* Backward: x gets the upstream gradient unchanged; the table gets ``sum`` of the gradient rows of the
  tokens that read each row (repeated positions summed, the ``padding_idx`` row zero, rows outside the
  table ignored), accumulated in fp32 (fp64 for fp64 tables) and returned in the table's dtype. Two Triton
  paths: fp32 atomic adds (fast, summation order unspecified), and a deterministic one (positions sorted
  stably, one program per table row summing its tokens in that order, no atomics) used with
  ``deterministic=True`` or, when ``deterministic`` is None, when
  ``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common
from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_disjoint,
    check_inplace_autograd,
    check_last_stride,
    check_position_args,
    check_position_values,
    check_tensor,
    check_writable,
    device_guard,
    next_pow2,
    on_cuda_graph_capture,
    prev_pow2,
    resolve_backend,
    token_positions,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["add_position_embedding_", "add_position_embedding", "LearnedPositionEmbedding"]


# ==============================================================================================
# Triton kernels
# ==============================================================================================
if HAS_TRITON:

    @triton.jit
    def _pe_add_kernel(
        x_ptr,
        out_ptr,
        table_ptr,
        pos_ptr,
        n_tokens,
        seqlen,
        n_rows,
        stride_x_b,
        stride_x_s,
        stride_o_b,
        stride_o_s,
        stride_t_p,
        stride_t_d,
        stride_pos_b,
        stride_pos_s,
        D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (token blocks, channel blocks). out[t, d] = x[t, d] + table[pos[t], d] for BLOCK_T tokens x
        BLOCK_D channels; the gather and the add happen in registers, one read of x, one write of out."""
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        tok_mask = t < n_tokens
        b = t // seqlen
        s = t - b * seqlen
        pos = tl.load(pos_ptr + b * stride_pos_b + s * stride_pos_s, mask=tok_mask, other=0).to(tl.int64)
        # A row outside the table (value checks off) reads as NaN: a loud result, never an out-of-bounds read.
        row_ok = tok_mask & (pos >= 0) & (pos < n_rows)
        d_mask = (d < D)[None, :]
        m = tok_mask[:, None] & d_mask
        emb = tl.load(
            table_ptr + pos[:, None] * stride_t_p + d[None, :] * stride_t_d,
            mask=row_ok[:, None] & d_mask,
            other=float("nan"),
        ).to(ACC)
        xv = tl.load(x_ptr + (b * stride_x_b + s * stride_x_s)[:, None] + d[None, :], mask=m, other=0.0).to(ACC)
        o_off = (b * stride_o_b + s * stride_o_s)[:, None] + d[None, :]
        tl.store(out_ptr + o_off, (xv + emb).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _pe_grad_atomic_kernel(
        g_ptr,
        acc_ptr,
        pos_ptr,
        n_pos,
        n_batch,
        seqlen,
        n_rows,
        padding_idx,
        stride_g_b,
        stride_g_s,
        stride_pos_b,
        stride_pos_s,
        D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SHARED: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (position blocks, channel blocks). Adds the gradient rows of BLOCK_T tokens into the fp32 (fp64)
        accumulator ``acc[P, D]`` with atomics. SHARED ([S] positions, the same for every sequence): each lane
        owns a position s, sums g[:, s] over the batch in registers first, then makes one atomic add - B
        times fewer atomics, and none contended when positions are distinct."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        p_mask = p < n_pos
        d_mask = (d < D)[None, :]
        if SHARED:
            s = p
            pos = tl.load(pos_ptr + s * stride_pos_s, mask=p_mask, other=0).to(tl.int64)
            g = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
            bi = 0
            while bi < n_batch:  # while, not range(): Triton 3.6's interpreter cannot range() over int args
                g += tl.load(
                    g_ptr + (bi * stride_g_b + s * stride_g_s)[:, None] + d[None, :],
                    mask=p_mask[:, None] & d_mask,
                    other=0.0,
                ).to(ACC)
                bi += 1
        else:
            b = p // seqlen
            s = p - b * seqlen
            pos = tl.load(pos_ptr + b * stride_pos_b + s * stride_pos_s, mask=p_mask, other=0).to(tl.int64)
            g = tl.load(
                g_ptr + (b * stride_g_b + s * stride_g_s)[:, None] + d[None, :],
                mask=p_mask[:, None] & d_mask,
                other=0.0,
            ).to(ACC)
        # Rows outside the table (value checks off) and the padding row receive nothing.
        ok = p_mask & (pos >= 0) & (pos < n_rows) & (pos != padding_idx)
        tl.atomic_add(acc_ptr + pos[:, None] * D + d[None, :], g, mask=ok[:, None] & d_mask, sem="relaxed")

    @triton.jit
    def _pe_grad_sorted_kernel(
        g_ptr,
        out_ptr,
        order_ptr,
        bounds_ptr,
        n_batch,
        seqlen,
        padding_idx,
        stride_g_b,
        stride_g_s,
        stride_o_p,
        D: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SHARED: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (table rows, channel blocks). Deterministic table gradient, no atomics: row r's tokens are
        ``order[bounds[r]:bounds[r + 1]]`` (positions sorted stably); the program sums their gradient rows
        BLOCK_K at a time in that order with a fixed reduction tree and writes the row once (zeros for the
        padding row and for rows no token reads). SHARED: ``order`` holds sequence positions s, and each
        contributes g[0, s], ..., g[B-1, s]."""
        r = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = d < D
        start = tl.load(bounds_ptr + r)
        end = tl.load(bounds_ptr + r + 1)
        end = tl.where(r == padding_idx, start, end)  # the padding row gets no gradient
        if SHARED:
            nb = n_batch
        else:
            nb = 1
        n_entries = (end - start) * nb
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        # A while loop over the row's entries: data-dependent bounds work in every Triton interpreter (a
        # range() over in-kernel values does not in 3.6's) and compile to the same loop.
        j0 = n_entries * 0
        while j0 < n_entries:
            j = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
            j_mask = j < n_entries
            tok = tl.load(order_ptr + start + j // nb, mask=j_mask, other=0)
            if SHARED:
                b = j - (j // nb) * nb
                s = tok
            else:
                b = tok // seqlen
                s = tok - b * seqlen
            g = tl.load(
                g_ptr + (b * stride_g_b + s * stride_g_s)[:, None] + d[None, :],
                mask=j_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(ACC)
            acc += tl.sum(g, axis=0)
            j0 += BLOCK_K
        tl.store(out_ptr + r * stride_o_p + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


# ==============================================================================================
# Pure-torch implementation (CPU default; any device)
# ==============================================================================================
_TORCH_CHUNK_ELEMS = 1 << 21  # bounds the temporaries of the torch path (8 MiB of fp32 each)


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Register dtype: fp64 when any operand is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _values_checked(device: torch.device) -> bool:
    """Whether check_position_values ran (it is skipped with value checks off or under graph capture)."""
    return _common.value_checks_on(device)


def _add_torch(x, out, table, rows, checked: bool) -> None:
    """out = x + table[rows] for ``[B, S, D]`` x/out (out may be x), chunked along S. One ``torch.add`` with
    ``out=``: PyTorch computes a 16-bit or mixed pair in fp32 (its opmath type; fp64 with an fp64 operand)
    and rounds once on store, as the kernel does. With value checks skipped, rows outside the table become
    NaN (as in the kernel) instead of raising."""
    B, S, D = x.shape
    P = table.shape[0]
    shared = rows.stride(0) == 0  # same rows for every sequence: gather once per chunk
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, (1 if shared else B) * D))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[:1, s0:s1] if shared else rows[:, s0:s1]
        if checked:
            emb = table[r]
        elif P == 0:
            emb = table.new_full((*r.shape, D), float("nan"))
        else:
            ok = (r >= 0) & (r < P)
            emb = table[r.clamp(0, P - 1)].masked_fill(~ok[..., None], float("nan"))
        torch.add(x[:, s0:s1], emb, out=out[:, s0:s1])


def _grad_table_torch(g, positions, out, padding_idx: int, deterministic: bool) -> None:
    """Table gradient into ``out`` ``[P, D]``: index_add of the gradient rows in fp32 (fp64 for fp64 tables),
    chunked along S when the rows need converting. On CPU index_add_ adds the rows one after another
    (deterministic); on CUDA the deterministic path uses index_put_ with accumulate=True, which sorts the
    indices (PyTorch's deterministic kernel)."""
    B, S, D = g.shape
    num_rows = out.shape[0]
    acc_dtype = _acc_dtype(out.dtype)
    acc = out if out.dtype == acc_dtype else torch.empty(num_rows, D, dtype=acc_dtype, device=g.device)
    acc.zero_()
    rows = token_positions(positions, None, 0, B, S, g.device)
    chunk = S if g.dtype == acc_dtype else max(1, _TORCH_CHUNK_ELEMS // max(1, B * D))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[:, s0:s1].reshape(-1)
        gg = g[:, s0:s1].reshape(-1, D).to(acc_dtype)
        if not _values_checked(g.device):  # rows outside the table (value checks off) get nothing
            keep = (r >= 0) & (r < num_rows)
            r, gg = r[keep], gg[keep]
        if deterministic and g.device.type != "cpu":
            acc.index_put_((r,), gg, accumulate=True)
        else:
            acc.index_add_(0, r, gg)
    if padding_idx >= 0:
        acc[padding_idx] = 0
    if acc is not out:
        out.copy_(acc)


# ==============================================================================================
# Validation and launchers
# ==============================================================================================


def _as_bsd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def _norm_padding_idx(padding_idx: Optional[int], num_rows: int) -> int:
    """``padding_idx`` in ``[-P, P)`` (negative counts from the end, as nn.Embedding) -> ``[0, P)``; None -> -1."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, torch.SymInt)):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_rows <= padding_idx < num_rows:
        raise ValueError(f"padding_idx must lie in [-{num_rows}, {num_rows}) (the table's rows), got {padding_idx}")
    return padding_idx + num_rows if padding_idx < 0 else padding_idx


def _check_positions(positions, B: int, S: int, num_rows: int, device, *, values: bool) -> None:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor, got {type(positions).__name__}")
    check_position_args(positions, None, 0, batch=B, seqlen=S, device=device)
    if values and B * S > 0:
        check_position_values(positions, None, 0, seqlen=S, num_rows=num_rows, device=device)


def _check_add(x, table, positions, padding_idx, *, inplace: bool, values: bool) -> int:
    """Every check of the forward ops, before anything is written; returns the normalised padding_idx.
    ``values`` adds the checks that need real tensors (position values, aliasing): the op implementations run
    them, fakes and traced code cannot."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    check_last_stride("x", x)
    dev = x.device
    check_tensor("table", table, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    if table.shape[1] != x.shape[-1]:
        raise ValueError(
            f"table must be [P, D] with D = x.shape[-1] = {x.shape[-1]}, got shape {tuple(table.shape)}"
        )
    x3 = _as_bsd(x)
    _check_positions(positions, x3.shape[0], x3.shape[1], table.shape[0], dev, values=values)
    pad = _norm_padding_idx(padding_idx, table.shape[0])
    if inplace:
        check_writable("x", x)
        if values:
            try:
                check_disjoint("x", x, "table", table)
            except ValueError:
                raise ValueError("table must not overlap x: x is written in place while the table is read") from None
    return pad


def _check_backward(grad, positions, num_rows, padding_idx, dtype, *, values: bool) -> int:
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    if grad.numel():  # an empty upstream gradient may come expanded (all strides 0): nothing is read
        check_last_stride("grad", grad)
    if isinstance(num_rows, bool) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    g3 = _as_bsd(grad)
    _check_positions(positions, g3.shape[0], g3.shape[1], num_rows, grad.device, values=values)
    return _norm_padding_idx(padding_idx, num_rows)


_ELEMS_PER_PROGRAM = 4096


def _channel_block(D: int, widest: int) -> int:
    """Channels per program: among the power of two covering D (capped at ``widest``) and its half and
    quarter, the width that pads D least, the wider on ties (GPT-2's 768 -> 3 x 256 rather than a
    half-empty second block of 512; 1600 -> 128; 4096 -> widest)."""
    top = min(widest, next_pow2(D))
    return min((b for b in (top, top // 2, top // 4) if b >= 1), key=lambda b: (-(-D // b) * b, -b))


def _pe_add_blocks(D: int, n_tokens: int):
    """Tile heuristic: about 4096 elements per program (16 per thread over 8 warps, i.e. 128-bit accesses
    for fp32 and two of them for 16-bit dtypes), up to 512 channels wide (see ``_channel_block``) and the
    rest in tokens; tokens of a tile share nothing, so the only aim is enough bytes in flight per program."""
    block_d = _channel_block(D, 512)
    block_t = max(1, min(_ELEMS_PER_PROGRAM // block_d, next_pow2(n_tokens), 64))
    num_warps = prev_pow2(min(8, max(1, block_t * block_d // 512)))
    return block_t, block_d, num_warps


def _pe_add_launch(x, out, table, positions) -> None:
    """out = x + table[positions] for ``[B, S, D]`` x/out (out may be x); positions ``[B, S]`` or ``[S]``."""
    B, S, D = x.shape
    if B * S * D == 0:
        return
    if resolve_backend(x.device) != "triton":
        rows = token_positions(positions, None, 0, B, S, x.device)
        _add_torch(x, out, table, rows, _values_checked(x.device))
        return
    spos_b = positions.stride(0) if positions.dim() == 2 else 0
    spos_s = positions.stride(-1)
    block_t, block_d, num_warps = _pe_add_blocks(D, B * S)
    grid = (triton.cdiv(B * S, block_t), triton.cdiv(D, block_d))
    acc = tl.float64 if _acc_dtype(x.dtype, table.dtype) == torch.float64 else tl.float32
    with device_guard(x):
        _pe_add_kernel[grid](
            x, out, table, positions,
            B * S, S, table.shape[0],
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), table.stride(0), table.stride(1), spos_b, spos_s,
            D=D, BLOCK_T=block_t, BLOCK_D=block_d, ACC=acc, num_warps=num_warps,
        )  # fmt: skip


def _pe_grad_blocks(D: int, n: int, cap: int):
    """Backward tiles: up to 1024 channels wide, then ``block_k`` tokens (at most ``cap`` and the count
    ``n``) so a program holds about 4096 elements; warps as for the forward."""
    block_d = _channel_block(D, 1024)
    block_k = max(1, min(_ELEMS_PER_PROGRAM // block_d, next_pow2(n), cap))
    num_warps = prev_pow2(min(8, max(1, block_k * block_d // 512)))
    return block_k, block_d, num_warps


def _grad_table_triton(g, positions, out, padding_idx: int, deterministic: bool) -> None:
    B, S, D = g.shape
    num_rows = out.shape[0]
    acc = _acc_dtype(out.dtype)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    shared = positions.dim() == 1 and B > 1
    if not deterministic:
        buf = out if out.dtype == acc and out.is_contiguous() else torch.empty(num_rows, D, dtype=acc, device=g.device)
        buf.zero_()
        n_pos = S if shared else B * S
        spos_b = positions.stride(0) if positions.dim() == 2 else 0
        block_t, block_d, num_warps = _pe_grad_blocks(D, n_pos, 64)
        grid = (triton.cdiv(n_pos, block_t), triton.cdiv(D, block_d))
        with device_guard(g):
            _pe_grad_atomic_kernel[grid](
                g, buf, positions, n_pos, B, S, num_rows, padding_idx,
                g.stride(0), g.stride(1), spos_b, positions.stride(-1),
                D=D, BLOCK_T=block_t, BLOCK_D=block_d, SHARED=shared, ACC=acc_tl, num_warps=num_warps,
            )  # fmt: skip
        if buf is not out:
            out.copy_(buf)
        return
    # Deterministic: stable sort of the rows (token order kept within a row); row r's tokens are
    # order[bounds[r]:bounds[r + 1]]. No host sync: rows outside [0, P) fall outside every range.
    rows = positions.reshape(-1) if shared else positions.expand(B, S).reshape(-1)
    sorted_rows, order = torch.sort(rows.to(torch.int64), stable=True)
    bounds = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=g.device, dtype=torch.int64))
    # A row's entries come BLOCK_K at a time: in the shared case a row has B of them per token, otherwise
    # usually a handful (one per sequence that reaches it), so 8.
    block_k, block_d, num_warps = _pe_grad_blocks(D, B * S, next_pow2(B) if shared else 8)
    grid = (num_rows, triton.cdiv(D, block_d))
    with device_guard(g):
        _pe_grad_sorted_kernel[grid](
            g, out, order, bounds, B, S, padding_idx, g.stride(0), g.stride(1), out.stride(0),
            D=D, BLOCK_K=block_k, BLOCK_D=block_d, SHARED=shared, ACC=acc_tl, num_warps=num_warps,
        )  # fmt: skip


def _grad_table_launch(g, positions, out, padding_idx: int, deterministic: bool) -> None:
    """Writes every element of ``out`` ``[P, D]`` (the table's dtype; stride(-1) == 1): the table gradient
    for the upstream gradient ``g`` ``[B, S, D]``."""
    B, S, D = g.shape
    if out.numel() == 0:
        return
    if B * S == 0:
        out.zero_()
    elif resolve_backend(g.device) != "triton":
        _grad_table_torch(g, positions, out, padding_idx, deterministic)
    else:
        _grad_table_triton(g, positions, out, padding_idx, deterministic)


# ==============================================================================================
# torch.library ops
# ==============================================================================================


@torch.library.custom_op("posenc::add_position_embedding_", mutates_args=("x",))
def _add_pe_inplace_op(
    x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, padding_idx: Optional[int]
) -> None:
    """In place: x <- x + table[positions] (padding_idx matters only to the backward; validated here)."""
    _check_add(x, table, positions, padding_idx, inplace=True, values=True)
    x3 = _as_bsd(x)
    _pe_add_launch(x3, x3, table, positions)


@_add_pe_inplace_op.register_fake
def _(x, table, positions, padding_idx):
    _check_add(x, table, positions, padding_idx, inplace=True, values=False)


@torch.library.custom_op("posenc::add_position_embedding", mutates_args=())
def _add_pe_op(
    x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, padding_idx: Optional[int], deterministic: bool
) -> torch.Tensor:
    """Out of place: returns x + table[positions]. ``deterministic`` picks the backward's table-gradient path."""
    _check_add(x, table, positions, padding_idx, inplace=False, values=True)
    out = torch.empty_like(x)
    _pe_add_launch(_as_bsd(x), _as_bsd(out), table, positions)
    return out


@_add_pe_op.register_fake
def _(x, table, positions, padding_idx, deterministic):
    _check_add(x, table, positions, padding_idx, inplace=False, values=False)
    return torch.empty_like(x)


def _unit_stride(g: torch.Tensor) -> torch.Tensor:
    # Upstream gradients can be expanded (stride 0) views; the kernels need stride(-1) == 1.
    return g if g.stride(-1) == 1 or g.shape[-1] <= 1 else g.contiguous()


@torch.library.custom_op("posenc::position_embedding_backward", mutates_args=())
def _pe_backward_op(
    grad: torch.Tensor,
    positions: torch.Tensor,
    num_rows: int,
    padding_idx: Optional[int],
    deterministic: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient of ``x + table[positions]`` w.r.t. the ``[num_rows, D]`` table, in ``dtype``: the rows of
    ``grad`` summed per position (fp32/fp64 accumulation), the padding row zero."""
    pad = _check_backward(grad, positions, num_rows, padding_idx, dtype, values=True)
    out = torch.empty(num_rows, grad.shape[-1], dtype=dtype, device=grad.device)
    _grad_table_launch(_as_bsd(grad), positions, out, pad, deterministic)
    return out


@_pe_backward_op.register_fake
def _(grad, positions, num_rows, padding_idx, deterministic, dtype):
    _check_backward(grad, positions, num_rows, padding_idx, dtype, values=False)
    return grad.new_empty((num_rows, grad.shape[-1]), dtype=dtype)


def _pe_setup_context(ctx, inputs, output):
    x, table, positions, padding_idx, deterministic = inputs
    ctx.save_for_backward(positions)
    ctx.num_rows, ctx.table_dtype = table.shape[0], table.dtype
    ctx.padding_idx, ctx.deterministic = padding_idx, deterministic


def _pe_backward_common(ctx, grad):
    (positions,) = ctx.saved_tensors
    gx = grad if ctx.needs_input_grad[0] else None
    gt = None
    if ctx.needs_input_grad[1]:
        gt = torch.ops.posenc.position_embedding_backward(
            _unit_stride(grad), positions, ctx.num_rows, ctx.padding_idx, ctx.deterministic, ctx.table_dtype
        )
    return gx, gt


def _pe_backward(ctx, grad):
    gx, gt = _pe_backward_common(ctx, grad)
    return gx, gt, None, None, None


_add_pe_op.register_autograd(_pe_backward, setup_context=_pe_setup_context)


class _AddPEInplaceFunction(torch.autograd.Function):
    """In-place autograd: marks x dirty (PyTorch's in-place rules apply); backward passes the gradient to x
    and sums it per position into the table."""

    @staticmethod
    def forward(ctx, x, table, positions, padding_idx, deterministic):
        torch.ops.posenc.add_position_embedding_(x, table, positions, padding_idx)
        ctx.mark_dirty(x)
        _pe_setup_context(ctx, (x, table, positions, padding_idx, deterministic), None)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _pe_backward(ctx, grad)


# ==============================================================================================
# Public functions
# ==============================================================================================


def _check_arg_types(x, table, positions, padding_idx) -> None:
    """The argument kinds, checked before the op's schema would reject them with a generic message."""
    check_tensor("x", x)
    check_tensor("table", table)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor, got {type(positions).__name__}")
    if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")


def _resolve_deterministic(deterministic: Optional[bool]) -> bool:
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    return deterministic


def _check_inplace_target(x: torch.Tensor, table) -> None:
    """Autograd's in-place errors, raised before anything is written: for x itself when it requires grad,
    and, when only the table does, for views autograd refuses to let become part of a graph."""
    check_inplace_autograd("x", x, grad_from_other_input=table.requires_grad)


def add_position_embedding_(
    x: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    *,
    padding_idx: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """In place ``x <- x + table[positions]`` in one pass (fused gather + add, fp32 math). Returns ``x``.

    ``x`` is ``[B, S, D]`` or ``[T, D]`` (any strides with ``stride(-1) == 1``), ``table`` ``[P, D]`` of any
    float dtype, ``positions`` integer ``[B, S]`` or ``[S]`` (``[T]`` for 2-D x) in ``[0, P)``.
    Differentiable w.r.t. x and table (PyTorch's in-place rules apply to x). The table's gradient sums the
    gradient rows of repeated positions and leaves the ``padding_idx`` row zero; ``deterministic=True``
    (or None while ``torch.are_deterministic_algorithms_enabled()``) makes it bitwise reproducible.

    >>> import torch
    >>> from posenc_kernels.learned import add_position_embedding_
    >>> x, table = torch.zeros(2, 3, 4), torch.randn(10, 4)
    >>> pos = torch.tensor([7, 0, 7])
    >>> y = add_position_embedding_(x, table, pos)
    >>> y is x, torch.equal(x[1, 2], table[7])
    (True, True)
    """
    _check_arg_types(x, table, positions, padding_idx)
    det = _resolve_deterministic(deterministic)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or table.requires_grad)
    if needs_grad:
        # Checked before anything is written, including autograd's own in-place errors (a custom Function
        # raises them only after its forward ran). Traced code has no storage or values to inspect.
        if not torch.compiler.is_compiling():
            _check_add(x, table, positions, padding_idx, inplace=True, values=True)
            _check_inplace_target(x, table)
        return _AddPEInplaceFunction.apply(x, table, positions, padding_idx, det)
    torch.ops.posenc.add_position_embedding_(x, table, positions, padding_idx)
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
    >>> from posenc_kernels.learned import add_position_embedding
    >>> table = torch.randn(16, 8, requires_grad=True)
    >>> y = add_position_embedding(torch.randn(2, 5, 8), table, torch.arange(5), padding_idx=0)
    >>> y.sum().backward()
    >>> table.grad[0].abs().sum().item(), table.grad[1, 0].item(), table.grad[5:].abs().sum().item()
    (0.0, 2.0, 0.0)
    """
    _check_arg_types(x, table, positions, padding_idx)
    det = _resolve_deterministic(deterministic)
    return torch.ops.posenc.add_position_embedding(x, table, positions, padding_idx, det)


class LearnedPositionEmbedding(torch.nn.Module):
    """A learned ``[num_positions, dim]`` table (``weight``, initialised N(0, 0.02), the padding row zero);
    ``forward(x, positions)`` returns ``x + weight[positions]`` out of place, fused.

    ``positions`` defaults to ``0..S-1``. ``weight`` is named as nn.Embedding's, so GPT-2's ``wpe.weight``
    loads into it.

    >>> import torch
    >>> from posenc_kernels.learned import LearnedPositionEmbedding
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
        self.padding_idx = None if padding_idx is None else _norm_padding_idx(padding_idx, num_positions)
        self.weight = torch.nn.Parameter(torch.empty(num_positions, dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=0.02)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
        """``x + weight[positions]``; without positions, tokens sit at ``offset + s`` (decode: pass the
        cache length, as with :class:`SinusoidalPositionalEncoding`)."""
        if positions is None:
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise TypeError(f"offset must be an int, got {type(offset).__name__}")
            seqlen = x.shape[-2] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
            positions = offset + torch.arange(seqlen, device=x.device if isinstance(x, torch.Tensor) else None)
        elif offset != 0:
            raise ValueError("pass positions or offset, not both")
        return add_position_embedding(x, self.weight, positions, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_positions}, {self.dim}{pad}"
