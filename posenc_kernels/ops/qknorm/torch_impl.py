"""QK-norm + RoPE in pure torch (any device): the CPU path without the native extension, the ``torch``
backend, and the math of the backward every backend shares (:func:`norm_backward`). fp32 math (fp64 for
fp64 inputs), one cast on store; the rotation is the RoPE family's own torch path on the fp32 values."""

from __future__ import annotations

import torch

from ..rope.op import RopeArgs
from ..rope.torch_impl import _rotate, _rows

HEAD, HEADS = 0, 1  # the ops' norm codes: over each head's D channels, over all heads of a token


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dims(norm: int) -> tuple:
    return (-1,) if norm == HEAD else (-2, -1)


def scale_of(weight, weight_offset: float, norm: int, shape, acc):
    """``weight_offset + w`` shaped to broadcast over ``[B, S, H, D]`` (None: no scale)."""
    if weight is None:
        return None
    w = weight.to(acc)
    if norm == HEADS:
        w = w.view(shape[-2], shape[-1])
    return w + weight_offset if weight_offset != 0.0 else w


def normalise(x: torch.Tensor, weight, eps: float, norm: int, weight_offset: float):
    """``(x_hat, rstd, y)`` in the accumulation dtype: ``x_hat = x * rstd``, ``y = x_hat * (offset + w)``."""
    acc = acc_of(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.square().mean(dim=_dims(norm), keepdim=True) + eps)
    x_hat = xf * rstd
    g = scale_of(weight, weight_offset, norm, x.shape, acc)
    return x_hat, rstd, (x_hat * g if g is not None else x_hat)


def qk_norm_rope_torch(q, k, q_out, k_out, q_weight, k_weight, eps, norm, weight_offset, *rest) -> None:
    """Normalise then rotate 4-D ``q``/``k`` ``[B, S, H, D]`` into ``q_out``/``k_out`` (which may be q/k)."""
    a = RopeArgs(*rest)
    B, S = q.shape[0], q.shape[1]
    if B * S == 0:
        return
    rows = _rows(a, B, S, q.device)
    for x, out, w in ((q, q_out, q_weight), (k, k_out, k_weight)):
        if x is None or x.shape[2] == 0:
            continue
        y = normalise(x, w, eps, norm, weight_offset)[2]
        _rotate(y, y, rows, a)  # in the accumulation dtype: one rounding, on the store below
        out.copy_(y)


def norm_backward(x, grad_weight_of, eps, norm, weight_offset, grad_y, *, scale_weight):
    """Gradients of ``y = rmsnorm(x) * (offset + w)`` (``w`` = ``scale_weight``, None: no scale) given
    ``grad_y`` (already rotated back, in the accumulation dtype): ``(grad_x in x's dtype, grad_w)``, where
    ``grad_w`` is computed only when ``grad_weight_of`` (the weight) is given, in its dtype. It is a
    fixed-order sum over tokens (and heads, for ``"head"``): deterministic."""
    x_hat, rstd, _ = normalise(x, None, eps, norm, 0.0)
    g = scale_of(scale_weight, weight_offset, norm, x.shape, x_hat.dtype)
    grad_w = None
    if grad_weight_of is not None:
        red = tuple(range(x.dim() - (1 if norm == HEAD else 2)))
        grad_w = (grad_y * x_hat).sum(dim=red).reshape(grad_weight_of.shape).to(grad_weight_of.dtype)
    gh = grad_y * g if g is not None else grad_y
    grad_x = rstd * (gh - x_hat * (gh * x_hat).mean(dim=_dims(norm), keepdim=True))
    return grad_x.to(x.dtype), grad_w
