"""Relative position bias ops: the schemas (their one definition), the checks shared by the fakes and every
implementation, the implementations per backend (Triton, torch; no native kernel), and autograd.

``posenc::alibi_bias`` (differentiable w.r.t. the slopes), ``posenc::t5_relative_bias`` (w.r.t. the bucket
table, through ``posenc::t5_relative_bias_backward``: deterministic, no atomics).
"""

from __future__ import annotations

import torch

from .. import registry
from ..checks import FLOAT_DTYPES, acc_dtype, check_tensor
from .buckets import check_bucket_args, check_lengths
from .kernel import alibi_triton, t5_backward_triton, t5_triton
from .torch_impl import alibi_torch, rel_offsets, t5_backward_torch, t5_torch


def check_alibi(slopes, Lq, Lk, causal, q_offset, dtype, *, values: bool = True) -> None:
    check_tensor("slopes", slopes, dtypes=FLOAT_DTYPES, ndim=1)
    check_lengths(Lq, Lk, q_offset)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")


def check_t5(table, Lq, Lk, bidirectional, max_distance, q_offset, *, values: bool = True, num_buckets=None) -> None:
    check_tensor("table", table, dtypes=FLOAT_DTYPES, ndim=2)
    if num_buckets is not None and num_buckets != table.shape[0]:
        raise ValueError(
            f"num_buckets ({num_buckets}) must equal table.shape[0] (table is [num_buckets, H], got "
            f"{tuple(table.shape)})"
        )
    check_bucket_args(table.shape[0], max_distance, bidirectional)
    check_lengths(Lq, Lk, q_offset)


def check_t5_backward(grad, num_buckets, Lq, Lk, bidirectional, max_distance, q_offset, *, values: bool) -> None:
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, ndim=3)
    check_bucket_args(num_buckets, max_distance, bidirectional)
    check_lengths(Lq, Lk, q_offset)
    if tuple(grad.shape[1:]) != (Lq, Lk):
        raise ValueError(f"grad must have shape [H, Lq, Lk] = [H, {Lq}, {Lk}], got {tuple(grad.shape)}")


def _alibi_impl(launch):
    def impl(slopes, Lq, Lk, causal, q_offset, dtype):
        """``[H, Lq, Lk]`` ALiBi bias in ``dtype`` (math in fp32, fp64 for fp64 outputs)."""
        out = torch.empty((slopes.shape[0], Lq, Lk), dtype=dtype, device=slopes.device)
        if out.numel():
            launch(out, slopes, Lq, Lk, causal, q_offset)
        return out

    return impl


def _t5_impl(triton: bool):
    def impl(table, Lq, Lk, bidirectional, max_distance, q_offset):
        if table.shape[1] * Lq * Lk == 0:
            return table.new_empty((table.shape[1], Lq, Lk))
        if not triton:
            return t5_torch(table, Lq, Lk, q_offset, bidirectional, max_distance)
        out = table.new_empty((table.shape[1], Lq, Lk))
        t5_triton(out, table, Lq, Lk, q_offset, bidirectional, max_distance)
        return out

    return impl


def _t5_backward_impl(triton: bool):
    def impl(grad, num_buckets, Lq, Lk, bidirectional, max_distance, q_offset):
        H = grad.shape[0]
        if H == 0 or Lq == 0 or Lk == 0:
            return grad.new_zeros((num_buckets, H))
        if not triton:
            return t5_backward_torch(grad, num_buckets, Lq, Lk, q_offset, bidirectional, max_distance)
        gtable = grad.new_empty((num_buckets, H))
        t5_backward_triton(grad, gtable, Lq, Lk, q_offset, bidirectional, max_distance)
        return gtable

    return impl


alibi_bias_op = registry.define(
    "alibi_bias(Tensor slopes, SymInt Lq, SymInt Lk, bool causal, SymInt q_offset, ScalarType dtype) -> Tensor",
    check=check_alibi,
    fake=lambda slopes, Lq, Lk, causal, q_offset, dtype: slopes.new_empty((slopes.shape[0], Lq, Lk), dtype=dtype),
    impls={"triton": _alibi_impl(alibi_triton), "torch": _alibi_impl(alibi_torch)},
)

t5_relative_bias_op = registry.define(
    "t5_relative_bias(Tensor table, SymInt Lq, SymInt Lk, bool bidirectional, SymInt max_distance, SymInt q_offset) "
    "-> Tensor",
    check=check_t5,
    fake=lambda table, Lq, Lk, *rest: table.new_empty((table.shape[1], Lq, Lk)),
    impls={"triton": _t5_impl(True), "torch": _t5_impl(False)},
)

t5_relative_bias_backward = registry.define(
    "t5_relative_bias_backward(Tensor grad, SymInt num_buckets, SymInt Lq, SymInt Lk, bool bidirectional, "
    "SymInt max_distance, SymInt q_offset) -> Tensor",
    check=check_t5_backward,
    fake=lambda grad, num_buckets, *rest: grad.new_empty((num_buckets, grad.shape[0])),
    impls={"triton": _t5_backward_impl(True), "torch": _t5_backward_impl(False)},
)


def _alibi_setup_context(ctx, inputs, output):
    slopes, Lq, Lk, causal, q_offset, _ = inputs
    ctx.args = (Lq, Lk, causal, q_offset)
    ctx.slopes_dtype = slopes.dtype


def _alibi_backward(ctx, grad):
    # d bias[h, i, j] / d slope[h] = the distance term: the slope gradient is sum_ij grad * distance.
    Lq, Lk, causal, q_offset = ctx.args
    acc = acc_dtype(grad.dtype, ctx.slopes_dtype)
    rel = rel_offsets(Lq, Lk, q_offset, grad.device).to(acc)
    dist = rel if causal else -rel.abs()
    g = (grad.to(acc) * dist).sum(dim=(-2, -1)).to(ctx.slopes_dtype)
    return g, None, None, None, None, None


def _alibi_jvp(primals, tangents):
    return alibi_bias_op(tangents["slopes"], *primals[1:])  # linear in the slopes


registry.register_autograd(
    "alibi_bias", _alibi_backward, setup_context=_alibi_setup_context, differentiable=("slopes",), jvp=_alibi_jvp
)


def _t5_setup_context(ctx, inputs, output):
    table, Lq, Lk, bidirectional, max_distance, q_offset = inputs
    ctx.args = (table.shape[0], Lq, Lk, bidirectional, max_distance, q_offset)
    ctx.table_dtype = table.dtype


def _t5_backward(ctx, grad):
    g = t5_relative_bias_backward(grad, *ctx.args)
    return g.to(ctx.table_dtype), None, None, None, None, None


def _t5_jvp(primals, tangents):
    return t5_relative_bias_op(tangents["table"].to(primals[0].dtype), *primals[1:])  # linear in the table


registry.register_autograd(
    "t5_relative_bias", _t5_backward, setup_context=_t5_setup_context, differentiable=("table",), jvp=_t5_jvp
)


# The backward is linear in grad and its adjoint is the forward lookup: double backward and forward AD.
def _t5_bwd_setup_context(ctx, inputs, output):
    ctx.args = tuple(inputs[2:])  # Lq, Lk, bidirectional, max_distance, q_offset
    ctx.grad_dtype = inputs[0].dtype


def _t5_bwd_backward(ctx, gg):
    return (t5_relative_bias_op(gg, *ctx.args).to(ctx.grad_dtype),) + (None,) * 6


def _t5_bwd_jvp(primals, tangents):
    return t5_relative_bias_backward(tangents["grad"].to(primals[0].dtype), *primals[1:])


registry.register_autograd(
    "t5_relative_bias_backward", _t5_bwd_backward, setup_context=_t5_bwd_setup_context, differentiable=("grad",),
    jvp=_t5_bwd_jvp,
)  # fmt: skip
