"""Learned position embedding ops: the pair ``posenc::add_position_embedding_`` / ``add_position_embedding``
(``x + table[positions]``; backward: x gets the gradient unchanged, the table the per-row sums of
``posenc::position_embedding_backward``), their checks, implementations and autograd. The native extension
implements the pair for CPU (``csrc/learned_cpu.cpp``).

Contract: ``x`` ``[B, S, D]`` or ``[T, D]`` and ``table`` ``[P, D]`` of any float dtypes and strides;
``positions`` integer ``[B, S]`` or ``[S]`` (``[T]`` for 2-D x) in ``[0, P)``, checked once per call. A row
outside the table (value checks off) reads as NaN and gets no gradient: never an out-of-bounds access.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from ..pair import define_pair
from ..checks import FLOAT_DTYPES, check_disjoint, check_tensor, check_writable, skip_value_checks
from ..positions import check_position_args, check_position_values
from .kernel import grad_table_triton, pe_add_triton
from .torch_impl import grad_table_torch, pe_add_torch


def _as_bsd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def norm_padding_idx(padding_idx: Optional[int], num_rows: int) -> int:
    """``padding_idx`` in ``[-P, P)`` (negative counts from the end, as nn.Embedding) -> ``[0, P)``; None -> -1."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, torch.SymInt)):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_rows <= padding_idx < num_rows:
        raise ValueError(f"padding_idx must lie in [-{num_rows}, {num_rows}) (the table's rows), got {padding_idx}")
    return padding_idx + num_rows if padding_idx < 0 else padding_idx


def _check_positions(positions, B: int, S: int, device) -> None:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor, got {type(positions).__name__}")
    check_position_args(positions, None, 0, batch=B, seqlen=S, device=device)


def check_add(x, table, positions, padding_idx, *rest, values: bool, inplace: bool) -> None:
    """Every check of the forward ops, before anything is written. ``values`` adds the checks that need real
    tensors (position values, aliasing, writability): implementations run them, fakes cannot."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    dev = x.device
    check_tensor("table", table, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    if table.shape[1] != x.shape[-1]:
        raise ValueError(f"table must be [P, D] with D = x.shape[-1] = {x.shape[-1]}, got shape {tuple(table.shape)}")
    x3 = _as_bsd(x)
    B, S = x3.shape[0], x3.shape[1]
    _check_positions(positions, B, S, dev)
    norm_padding_idx(padding_idx, table.shape[0])
    if not values:
        return
    if inplace:
        check_writable("x", x)
        try:
            check_disjoint("x", x, "table", table)
        except ValueError:
            raise ValueError("table must not overlap x: x is written in place while the table is read") from None
    if B * S > 0:
        check_position_values(positions, None, 0, seqlen=S, num_rows=table.shape[0], device=dev)


def check_backward(grad, positions, num_rows, padding_idx, deterministic, dtype, *, values: bool) -> None:
    """The backward's checks: shapes and kinds only. The position values were checked by the forward (its
    saved, version-checked tensors); rows outside the table receive nothing in every implementation."""
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    if isinstance(num_rows, bool) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    g3 = _as_bsd(grad)
    _check_positions(positions, g3.shape[0], g3.shape[1], grad.device)
    norm_padding_idx(padding_idx, num_rows)


def _body(launch, outs, x, table, positions, padding_idx, deterministic):
    launch(_as_bsd(x), _as_bsd(outs[0]), table, positions)


def _backward_impl(launch):
    def impl(grad, positions, num_rows, padding_idx, deterministic, dtype):
        """Writes every element of the ``[num_rows, D]`` gradient."""
        out = torch.empty(num_rows, grad.shape[-1], dtype=dtype, device=grad.device)
        g3 = _as_bsd(grad)
        if out.numel() == 0:
            return out
        if g3.shape[0] * g3.shape[1] == 0:
            return out.zero_()
        launch(g3, positions, out, norm_padding_idx(padding_idx, num_rows), deterministic)
        return out

    return impl


#: The launchers, per backend: ``add(x, out, table, positions)`` for ``[B, S, D]`` x/out, and
#: ``grad(g, positions, out, padding_idx, deterministic)`` writing every element of ``out`` ``[P, D]``.
ADD_LAUNCHERS = {"triton": pe_add_triton, "torch": pe_add_torch}
GRAD_LAUNCHERS = {"triton": grad_table_triton, "torch": grad_table_torch}

position_embedding_backward = registry.define(
    "position_embedding_backward(Tensor grad, Tensor positions, SymInt num_rows, SymInt? padding_idx, "
    "bool deterministic, ScalarType dtype) -> Tensor",
    check=check_backward,
    fake=lambda grad, positions, num_rows, padding_idx, deterministic, dtype: grad.new_empty(
        (num_rows, grad.shape[-1]), dtype=dtype
    ),
    impls={k: _backward_impl(v) for k, v in GRAD_LAUNCHERS.items()},
)


def _gather(table, positions, padding_idx, zeros):
    """``zeros + table[positions]`` (0 at padding_idx unless None), with the forward op:
    the derivative of the table gradient, differentiable again through it (any order)."""
    if padding_idx is not None:
        keep = torch.ones(table.shape[0], 1, dtype=table.dtype, device=table.device)
        keep[norm_padding_idx(padding_idx, table.shape[0])] = 0
        table = table * keep
    with skip_value_checks():  # the forward checked these positions (saved, version-checked)
        return add_position_embedding.out(zeros, table, positions, None, False)


def _backward_setup_context(ctx, inputs, output):
    grad, positions, num_rows, padding_idx, deterministic, dtype = inputs
    ctx.save_for_backward(positions)
    ctx.padding_idx, ctx.grad_shape, ctx.grad_dtype = padding_idx, tuple(grad.shape), grad.dtype


def _backward_backward(ctx, gg):
    # position_embedding_backward is linear in grad: its adjoint is the gather of the forward.
    (positions,) = ctx.saved_tensors
    zeros = gg.new_zeros(ctx.grad_shape, dtype=ctx.grad_dtype)
    out = _gather(gg, positions, ctx.padding_idx, zeros) if ctx.needs_input_grad[0] else None
    return out, None, None, None, None, None


def _backward_jvp(primals, tangents):
    grad, positions, num_rows, padding_idx, deterministic, dtype = primals
    return position_embedding_backward(tangents["grad"], positions, num_rows, padding_idx, deterministic, dtype)


registry.register_autograd(
    "position_embedding_backward", _backward_backward, setup_context=_backward_setup_context,
    differentiable=("grad",), jvp=_backward_jvp,
)  # fmt: skip


def _jvp(primals, tangents):
    # Linear in x and the table: dx + dtable[positions] (the padding row included: it is read by the
    # forward; only its gradient is frozen, as nn.Embedding's).
    x, table, positions = primals[:3]
    zeros = tangents["x"] if "x" in tangents else torch.zeros_like(x)
    return _gather(tangents["table"], positions, None, zeros) if "table" in tangents else zeros


def _setup_context(ctx, inputs, output):
    x, table, positions, padding_idx, deterministic = inputs
    ctx.save_for_backward(positions)
    ctx.num_rows, ctx.table_dtype = table.shape[0], table.dtype
    ctx.padding_idx, ctx.deterministic = padding_idx, deterministic


def _backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    gx = grad if ctx.needs_input_grad[0] else None
    gt = None
    if ctx.needs_input_grad[1]:
        gt = position_embedding_backward(grad, positions, ctx.num_rows, ctx.padding_idx, ctx.deterministic, ctx.table_dtype)
    return gx, gt, None, None, None


add_position_embedding = define_pair(
    "add_position_embedding",
    "Tensor x, Tensor table, Tensor positions, SymInt? padding_idx, bool deterministic",
    mutates=("x",),
    differentiable=("x", "table"),
    functional_only={"deterministic": False},  # it shapes the table's gradient, not the forward
    check=check_add,
    body=_body,
    launchers=ADD_LAUNCHERS,
    setup_context=_setup_context,
    backward=_backward,
    native=True,
    jvp=_jvp,
)
