"""QK-norm + RoPE ops: the pair ``posenc::qk_norm_rope_`` / ``posenc::qk_norm_rope`` (q and k normalised by
RMSNorm, scaled by ``weight_offset + w``, then rotated; in place / out of place), with the check shared by
the fakes and every implementation. The RoPE arguments are the RoPE family's own (:data:`..rope.op._ARGS`,
checked by its :func:`..rope.op.check_rope`), so every rotation mode of ``apply_rope_`` is available.

Backward: the op ``posenc::qk_norm_rope_backward`` gives ``dq``, ``dk`` and the weights' gradients in one
call: on Triton one launch (the upstream gradient rotated back by -theta in registers, RMSNorm's gradient,
the weights' gradients as per-program rows summed afterwards in a fixed order: deterministic, no atomics);
on torch the RoPE family's torch rotation then :func:`.torch_impl.norm_backward`. Double backward
(``create_graph=True``) takes the same math from differentiable ops (the RoPE op rotating back, then torch).
"""

from __future__ import annotations

import math

import torch

from ..checks import FLOAT_DTYPES, check_tensor, skip_value_checks
from .. import registry
from ..pair import define_pair
from ..rope.op import _ARGS as ROPE_ARGS
from ..rope.op import RopeArgs, TENSOR_ARGS, check_rope, rope
from ..rope.torch_impl import rope_torch
from .kernel import qk_norm_rope_backward_triton, qk_norm_rope_triton
from .torch_impl import HEAD, HEADS, acc_of, norm_backward, qk_norm_rope_torch

NORM_ARGS = "Tensor? q_weight, Tensor? k_weight, float eps, SymInt norm, float weight_offset"
N_NORM = 5  # arguments between k and the RoPE ones


def _check_weight(name: str, w, x, xname: str, norm: int) -> None:
    if w is None:
        return
    check_tensor(name, w, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
    if w.dtype != x.dtype:
        raise TypeError(f"{name} must have {xname}'s dtype ({x.dtype}), got {w.dtype}")
    H, D = x.shape[-2], x.shape[-1]
    if norm == HEAD and w.shape[0] != D:
        raise ValueError(f"{name} must be [D] = [{D}] for norm='head' (one weight per channel), got {tuple(w.shape)}")
    if norm == HEADS and w.shape[0] != H * D:
        hint = " (a per-head weight [D]: use norm='head')" if w.shape[0] == D else ""
        raise ValueError(
            f"{name} must be [H*D] = [{H}*{D}] = [{H * D}] for norm='heads' (one weight per channel of all "
            f"heads){hint}, got {tuple(w.shape)}"
        )


def check_qk_norm_rope(q, k, q_weight, k_weight, eps, norm, weight_offset, *rest, values: bool, inplace: bool):
    """Every check of both ops, before anything is written: the norm's arguments, then RoPE's own check."""
    if isinstance(norm, bool) or norm not in (HEAD, HEADS):
        raise ValueError(f"norm must be 'head' or 'heads' (codes {HEAD}, {HEADS}), got {norm!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not isinstance(weight_offset, (int, float)) or not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be a finite float, got {weight_offset!r}")
    if RopeArgs(*rest).conjugate:
        raise ValueError(
            "conjugate must be False for qk_norm_rope (RoPE's backward flag; qk_norm_rope's backward is its own op)"
        )
    check_rope(q, k, *rest, values=False, inplace=inplace)  # shapes first: the weights' lengths need them
    _check_weight("q_weight", q_weight, q, "q", norm)
    if k is None and k_weight is not None:
        raise ValueError("k_weight was given without k")
    if k is not None:
        _check_weight("k_weight", k_weight, k, "k", norm)
    if values:
        check_rope(q, k, *rest, values=True, inplace=inplace)


def _as_4d(t):
    return t.unsqueeze(0) if t is not None and t.dim() == 3 else t


def _body(launch, outs, q, k, *rest):
    launch(_as_4d(q), _as_4d(k), _as_4d(outs[0]), _as_4d(outs[1]) if k is not None else None, *rest)


def _setup_context(ctx, inputs, output):
    q, k, qw, kw, eps, norm, offset = inputs[: 2 + N_NORM]
    a = RopeArgs(*inputs[2 + N_NORM :])
    ctx.save_for_backward(q, k, qw, kw, *(getattr(a, n) for n in TENSOR_ARGS))
    ctx.norm_args = (eps, norm, offset)
    ctx.scalars = {n: getattr(a, n) for n in RopeArgs._fields if n not in TENSOR_ARGS}


def _backward(ctx, grad_q, grad_k):
    q, k, qw, kw, *tensors = ctx.saved_tensors
    eps, norm, offset = ctx.norm_args
    rest = RopeArgs(**dict(zip(TENSOR_ARGS, tensors), **ctx.scalars))
    need = ctx.needs_input_grad
    has_k = k is not None
    if has_k and grad_k is None:
        grad_k = torch.zeros_like(k)
    tail = (None,) * (N_NORM - 2 + len(RopeArgs._fields))
    if not torch.is_grad_enabled():  # the fused backward op (one launch on the Triton backend)
        with skip_value_checks():  # forward checked these very tensors (saved, version-checked)
            dq, dk, dqw, dkw = backward_op(grad_q, grad_k if has_k else None, q, k, qw, kw, eps, norm, offset,
                                           bool(need[2]), bool(need[3]), *rest)  # fmt: skip
        return (dq, dk if has_k else None, dqw if need[2] else None, dkw if need[3] else None) + tail
    # double backward: the same math from differentiable ops (the RoPE op rotating back, then torch)
    kw_rope = rest._asdict()
    kw_rope["conjugate"] = not kw_rope["conjugate"]
    acc = acc_of(q.dtype)
    with skip_value_checks():
        gq, gk = rope.out(grad_q.to(acc), grad_k.to(acc) if has_k else None, *RopeArgs(**kw_rope))
    dq, dqw = norm_backward(q, qw if need[2] else None, eps, norm, offset, gq, scale_weight=qw)
    dk = dkw = None
    if has_k:
        dk, dkw = norm_backward(k, kw if need[3] else None, eps, norm, offset, gk, scale_weight=kw)
    return (dq, dk, dqw, dkw) + tail


# ---- the backward op: dq, dk and the weights' gradients in one call (one Triton launch)

BACKWARD_ARGS = (
    f"Tensor grad_q, Tensor? grad_k, Tensor q, Tensor? k, {NORM_ARGS}, bool need_q_weight, bool need_k_weight, "
    f"{ROPE_ARGS}"
)


def check_backward(grad_q, grad_k, q, k, qw, kw, eps, norm, offset, need_qw, need_kw, *rest, values: bool):
    check_qk_norm_rope(q, k, qw, kw, eps, norm, offset, *rest, values=values, inplace=False)
    for name, g, x in (("grad_q", grad_q, q), ("grad_k", grad_k, k)):
        if x is None:
            continue
        check_tensor(name, g, dtypes=FLOAT_DTYPES, device=x.device)
        if g.shape != x.shape:
            raise ValueError(f"{name} must have the shape of {name[-1]} {tuple(x.shape)}, got {tuple(g.shape)}")


def _backward_outs(q, k, qw, kw, need_qw, need_kw):
    e = q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k) if k is not None else e,
            torch.empty_like(qw) if need_qw and qw is not None else e,
            torch.empty_like(kw) if need_kw and kw is not None and k is not None else e)  # fmt: skip


def _backward_fake(grad_q, grad_k, q, k, qw, kw, eps, norm, offset, need_qw, need_kw, *rest):
    return _backward_outs(q, k, qw, kw, need_qw, need_kw)


def _backward_triton(grad_q, grad_k, q, k, qw, kw, eps, norm, offset, need_qw, need_kw, *rest):
    dq, dk, dqw, dkw = _backward_outs(q, k, qw, kw, need_qw, need_kw)
    wq, wk = qk_norm_rope_backward_triton(
        _as_4d(grad_q), _as_4d(grad_k) if k is not None else None, _as_4d(q), _as_4d(k), qw, kw, eps, norm, offset,
        need_qw, need_kw, _as_4d(dq), _as_4d(dk) if k is not None else None, *rest,
    )  # fmt: skip
    if wq is not None:
        dqw.copy_(wq)
    if wk is not None:
        dkw.copy_(wk)
    return dq, dk, dqw, dkw


def _backward_torch(grad_q, grad_k, q, k, qw, kw, eps, norm, offset, need_qw, need_kw, *rest):
    dq, dk, dqw, dkw = _backward_outs(q, k, qw, kw, need_qw, need_kw)
    a = RopeArgs(*rest)._replace(conjugate=not RopeArgs(*rest).conjugate)
    acc = acc_of(q.dtype)
    gq = grad_q.to(acc, copy=True)
    gk = grad_k.to(acc, copy=True) if k is not None else None
    rope_torch(_as_4d(gq), _as_4d(gk), _as_4d(gq), _as_4d(gk), a)  # rotate back, in place
    dq_, dqw_ = norm_backward(q, qw if need_qw else None, eps, norm, offset, gq, scale_weight=qw)
    dq.copy_(dq_)
    if dqw_ is not None:
        dqw.copy_(dqw_)
    if k is not None:
        dk_, dkw_ = norm_backward(k, kw if need_kw else None, eps, norm, offset, gk, scale_weight=kw)
        dk.copy_(dk_)
        if dkw_ is not None:
            dkw.copy_(dkw_)
    return dq, dk, dqw, dkw


backward_op = registry.define(
    f"qk_norm_rope_backward({BACKWARD_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
    check=check_backward,
    fake=_backward_fake,
    impls={"triton": _backward_triton, "torch": _backward_torch},
)


def _torch_launch(q, k, q_out, k_out, *rest):
    qk_norm_rope_torch(q, k, q_out, k_out, *rest)


qk_norm_rope = define_pair(
    "qk_norm_rope",
    f"Tensor q, Tensor? k, {NORM_ARGS}, {ROPE_ARGS}",
    mutates=("q", "k"),
    differentiable=("q", "k", "q_weight", "k_weight"),
    check=check_qk_norm_rope,
    body=_body,
    launchers={"triton": qk_norm_rope_triton, "torch": _torch_launch},
    setup_context=_setup_context,
    backward=_backward,
    native=True,
    save_inputs=True,  # backward needs q and k as they were: the in-place Function keeps a copy
)
