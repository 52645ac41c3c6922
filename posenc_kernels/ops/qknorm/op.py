"""QK-norm + RoPE ops: the pair ``posenc::qk_norm_rope_`` / ``posenc::qk_norm_rope`` (q and k normalised by
RMSNorm, scaled by ``weight_offset + w``, then rotated; in place / out of place), with the check shared by
the fakes and every implementation. The RoPE arguments are the RoPE family's own (:data:`..rope.op._ARGS`,
checked by its :func:`..rope.op.check_rope`), so every rotation mode of ``apply_rope_`` is available.

Backward (every backend): the upstream gradient is rotated back by the RoPE op itself (``conjugate``), in
fp32, then RMSNorm's gradient (:func:`.torch_impl.norm_backward`): ``dq``, ``dk``, and the weights'
gradients as fixed-order sums (deterministic, no atomics).
"""

from __future__ import annotations

import math

import torch

from ..checks import FLOAT_DTYPES, check_tensor, skip_value_checks
from ..pair import define_pair
from ..rope.op import _ARGS as ROPE_ARGS
from ..rope.op import RopeArgs, TENSOR_ARGS, check_rope, rope
from .kernel import qk_norm_rope_triton
from .torch_impl import HEAD, HEADS, acc_of, norm_backward, qk_norm_rope_torch

NORM_ARGS = "Tensor? q_weight, Tensor? k_weight, float eps, int norm, float weight_offset"
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
        raise ValueError("conjugate must be False for qk_norm_rope (its backward rotates back with the RoPE op)")
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
    kw_rope = dict(zip(TENSOR_ARGS, tensors), **ctx.scalars)
    kw_rope["conjugate"] = not kw_rope["conjugate"]
    acc = acc_of(q.dtype)
    has_k = k is not None and grad_k is not None
    with skip_value_checks():  # forward checked these very tensors (saved, version-checked)
        gq, gk = rope.out(grad_q.to(acc), grad_k.to(acc) if has_k else None, *RopeArgs(**kw_rope))
    need = ctx.needs_input_grad
    dq, dqw = norm_backward(q, qw if need[2] else None, eps, norm, offset, gq, scale_weight=qw)
    dk = dkw = None
    if has_k:
        dk, dkw = norm_backward(k, kw if need[3] else None, eps, norm, offset, gk, scale_weight=kw)
    return (dq, dk, dqw, dkw) + (None,) * (N_NORM - 2 + len(RopeArgs._fields))


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
