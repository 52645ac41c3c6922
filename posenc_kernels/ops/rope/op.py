"""RoPE ops: the pair ``posenc::rope_`` / ``posenc::rope`` (q and k rotated in place / out of place; the
backward is the same op rotating by -theta) and the table op ``posenc::rope_cos_sin``, with the check
shared by the fakes and every implementation. The native extension implements the pair (``csrc/``).
"""

from __future__ import annotations

import collections
import math

import torch

from .. import registry
from ..pair import define_pair
from ..checks import (
    FLOAT_DTYPES, INT_DTYPES, acc_dtype, check_disjoint, check_tensor, check_writable, skip_value_checks, value_checks_on,
)  # fmt: skip
from ..positions import check_position_args, check_position_values
from .kernel import cos_sin_triton, rope_triton
from .torch_impl import cos_sin_torch, rope_torch

# Everything after q and k, in schema order: written once, read by both ops and by RopeArgs.
_ARGS = (
    "Tensor? cos, Tensor? sin, Tensor? inv_freq, Tensor? positions, Tensor? offsets, SymInt offset, "
    "Tensor? cu_seqlens, Tensor? axis_map, float attention_factor, bool interleaved, bool conjugate, bool exact"
)
RopeArgs = collections.namedtuple("RopeArgs", [a.split()[-1] for a in _ARGS.split(", ")])
TENSOR_ARGS = tuple(a.split()[-1] for a in _ARGS.split(", ") if a.startswith("Tensor"))

def _check_angles(a: RopeArgs, D: int, dev) -> int:
    """Tables or frequencies; returns R/2."""
    if a.inv_freq is None:
        if a.cos is None or a.sin is None:
            raise ValueError("pass cos and sin tables, or inv_freq for on-the-fly angles")
        for name, t in (("cos", a.cos), ("sin", a.sin)):
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
        if a.cos.shape != a.sin.shape:
            raise ValueError(f"cos and sin must have the same shape, got {tuple(a.cos.shape)} and {tuple(a.sin.shape)}")
        if a.cos.dtype != a.sin.dtype:
            raise TypeError(f"cos and sin must have the same dtype, got {a.cos.dtype} and {a.sin.dtype}")
        if a.attention_factor != 1.0:
            raise ValueError(
                "attention_factor scales on-the-fly angles (inv_freq); tables carry it already "
                "(rope_cos_sin(..., attention_factor=...))"
            )
        if a.exact:
            raise ValueError("exact applies to on-the-fly angles: pass inv_freq (float64) instead of cos/sin tables")
        half, what, src = a.cos.shape[1], "cos must have R/2 >= 1 columns (R = rotary dim), got 0", "2 * cos.shape[-1]"
    else:
        if a.cos is not None or a.sin is not None:
            raise ValueError("pass cos/sin tables or inv_freq, not both")
        check_tensor("inv_freq", a.inv_freq, dtypes=FLOAT_DTYPES, ndim=1, device=dev)
        if a.exact and a.inv_freq.dtype != torch.float64:
            raise TypeError(
                "exact=True needs inv_freq in float64 (rope_frequencies(..., dtype=torch.float64)): an fp32 "
                f"frequency alone is up to 0.25 rad off at position 2**22; got {a.inv_freq.dtype}"
            )
        if not math.isfinite(a.attention_factor):
            raise ValueError(f"attention_factor must be finite, got {a.attention_factor!r}")
        half = a.inv_freq.shape[0]
        what, src = "inv_freq must have R/2 >= 1 entries (R = rotary dim), got 0", "2 * inv_freq.shape[0]"
    if half == 0:
        raise ValueError(what)
    if 2 * half > D:
        raise ValueError(f"rotary dim R = {src} = {2 * half} exceeds head_dim D = {D}")
    return half


def _check_axes(a: RopeArgs, B: int, S: int, half: int, dev) -> None:
    m = a.axis_map
    if m.dtype == torch.bool or m.dtype not in INT_DTYPES:
        raise TypeError(f"axis_map must be an integer tensor, got dtype {m.dtype}")
    check_tensor("axis_map", m, ndim=1, device=dev)
    if a.cu_seqlens is not None:
        raise ValueError("axis_map needs explicit positions [A, ...]; it cannot be combined with cu_seqlens")
    if m.shape[0] != half:
        raise ValueError(f"axis_map must have one entry per frequency, [R/2] = [{half}], got {tuple(m.shape)}")
    p = a.positions
    if p is None:
        raise ValueError("axis_map needs positions [A, B, S] or [A, S] (one row of positions per axis)")
    check_tensor("positions", p, ndim=(2, 3), device=dev)
    if tuple(p.shape[1:]) not in [(S,), (B, S)] or p.shape[0] < 1:
        raise ValueError(
            f"with axis_map, positions must be [A, S] = [A, {S}] or [A, B, S] = [A, {B}, {S}], got {tuple(p.shape)}"
        )
    check_position_args(p[0], a.offsets, a.offset, batch=B, seqlen=S, device=dev)


def check_rope(q, k, *rest, values: bool, inplace: bool) -> None:
    """Every check of both ops, before anything is written. ``values`` adds those that need real tensors
    (aliasing; the position values, a host sync on CUDA): implementations run them, fakes cannot."""
    a = RopeArgs(*rest)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    dev, packed = q.device, q.dim() == 3
    B, S = (1, q.shape[0]) if packed else (q.shape[0], q.shape[1])
    D = q.shape[-1]
    if k is not None:
        check_tensor("k", k, ndim=q.dim(), device=dev)
        if k.dtype != q.dtype:
            raise TypeError(f"k must have the same dtype as q ({q.dtype}), got {k.dtype}")
        if packed and (k.shape[0], k.shape[2]) != (S, D):
            raise ValueError(f"k must be [T, Hk, D] = [{S}, Hk, {D}] to match q, got {tuple(k.shape)}")
        if not packed and (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
            raise ValueError(f"k must be [B, S, Hk, D] = [{B}, {S}, Hk, {D}] to match q, got {tuple(k.shape)}")
        if inplace and k is q:
            raise ValueError("k must not overlap q: shared elements would be rotated twice")
    half = _check_angles(a, D, dev)
    if a.cu_seqlens is not None and not packed:
        raise ValueError("cu_seqlens needs packed q/k [T, H, D] (tokens of all sequences back to back)")
    if a.axis_map is not None:
        _check_axes(a, B, S, half, dev)
    else:
        check_position_args(
            a.positions, a.offsets, a.offset, batch=B, seqlen=S, device=dev, cu_seqlens=a.cu_seqlens, packed=packed
        )
    if not values:
        return
    if inplace:
        check_writable("q", q)
        if k is not None:
            check_writable("k", k)
            check_disjoint("q", q, "k", k)
    if B * S > 0:
        rows = a.cos.shape[0] if a.inv_freq is None else None
        if a.axis_map is not None:
            if a.axis_map.numel() and value_checks_on(dev):
                lo, hi = (int(v) for v in torch.aminmax(a.axis_map.to(torch.int64)))
                if lo < 0 or hi >= a.positions.shape[0]:
                    raise ValueError(
                        f"axis_map values must lie in [0, {a.positions.shape[0]}) (positions' axes), got [{lo}, {hi}]"
                    )
            if rows is not None:
                check_position_values(a.positions, None, 0, seqlen=S, num_rows=rows, device=dev)
        else:
            check_position_values(
                a.positions, a.offsets, a.offset, seqlen=S, num_rows=rows, device=dev, cu_seqlens=a.cu_seqlens
            )


def _as_4d(t):
    return t.unsqueeze(0) if t is not None and t.dim() == 3 else t


def _body(launch, outs, q, k, *rest):
    launch(_as_4d(q), _as_4d(k), _as_4d(outs[0]), _as_4d(outs[1]) if k is not None else None, *rest)


def _torch_launch(q, k, q_out, k_out, *rest):
    rope_torch(q, k, q_out, k_out, RopeArgs(*rest))


def _setup_context(ctx, inputs, output):
    a = RopeArgs(*inputs[2:])
    ctx.save_for_backward(*(getattr(a, n) for n in TENSOR_ARGS))
    ctx.has_k = inputs[1] is not None
    ctx.scalars = {n: getattr(a, n) for n in RopeArgs._fields if n not in TENSOR_ARGS}


def backward_args(ctx) -> RopeArgs:
    """Forward's arguments with the rotation reversed (conjugate flipped)."""
    kw = dict(zip(TENSOR_ARGS, ctx.saved_tensors), **ctx.scalars)
    kw["conjugate"] = not kw["conjugate"]
    return RopeArgs(**kw)


def _backward(ctx, grad_q, grad_k):
    with skip_value_checks():  # forward checked these very tensors (saved, version-checked)
        gq, gk = rope.out(grad_q, grad_k if ctx.has_k else None, *backward_args(ctx))
    return (gq, gk if ctx.has_k else None) + (None,) * len(RopeArgs._fields)


def _jvp(primals, tangents):
    # Linear in q and k: the tangents are rotated as the values are.
    q, k = primals[0], primals[1]
    dq = tangents["q"] if "q" in tangents else torch.zeros_like(q)
    dk = None if k is None else tangents["k"] if "k" in tangents else torch.zeros_like(k)
    with skip_value_checks():  # the primal call checked these arguments
        tq, tk = rope.out(dq, dk, *primals[2:])
    return tq, tk if k is not None else None


rope = define_pair(
    "rope",
    f"Tensor q, Tensor? k, {_ARGS}",
    mutates=("q", "k"),
    check=check_rope,
    body=_body,
    launchers={"triton": rope_triton, "torch": _torch_launch},
    setup_context=_setup_context,
    backward=_backward,
    native=True,
    separable=True,  # k rotates exactly as q does: one autograd.Function per tensor
    jvp=_jvp,
)


# ---- tables


def check_cos_sin(positions, inv_freq, attention_factor, dtype, *, values: bool = False) -> None:
    check_tensor("positions", positions, dtypes=INT_DTYPES + FLOAT_DTYPES)
    check_tensor("inv_freq", inv_freq, dtypes=FLOAT_DTYPES, ndim=1, device=positions.device)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")


def _cos_sin_impl(launch):
    def impl(positions, inv_freq, attention_factor, dtype):
        shape = tuple(positions.shape) + (inv_freq.shape[0],)
        cos = torch.empty(shape, dtype=dtype, device=positions.device)
        sin = torch.empty(shape, dtype=dtype, device=positions.device)
        launch(positions, inv_freq, attention_factor, cos, sin)
        return cos, sin

    return impl


def _cos_sin_fake(positions, inv_freq, attention_factor, dtype):
    shape = tuple(positions.shape) + (inv_freq.shape[0],)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


rope_cos_sin_op = registry.define(
    "rope_cos_sin(Tensor positions, Tensor inv_freq, float attention_factor, ScalarType dtype) -> (Tensor, Tensor)",
    check=check_cos_sin,
    fake=_cos_sin_fake,
    impls={"triton": _cos_sin_impl(cos_sin_triton), "torch": _cos_sin_impl(cos_sin_torch)},
)


# d cos(a) = -sin(a) da and d sin(a) = cos(a) da with a = position * inv_freq (the outputs carry
# attention_factor): gradients and tangents of float positions and of inv_freq, from the saved outputs (so
# differentiable again).
def _cos_sin_setup_context(ctx, inputs, output):
    positions, inv_freq = inputs[0], inputs[1]
    ctx.save_for_backward(positions, inv_freq, *output)


def _cos_sin_backward(ctx, g_cos, g_sin):
    positions, inv_freq, cos, sin = ctx.saved_tensors
    acc = acc_dtype(cos.dtype, inv_freq.dtype, positions.dtype if positions.is_floating_point() else cos.dtype)
    ga = torch.zeros(cos.shape, dtype=acc, device=cos.device)
    if g_cos is not None:
        ga = ga - g_cos.to(acc) * sin.to(acc)
    if g_sin is not None:
        ga = ga + g_sin.to(acc) * cos.to(acc)
    gpos = ginv = None
    if ctx.needs_input_grad[0]:
        gpos = (ga * inv_freq.to(acc)).sum(-1).to(positions.dtype)
    if ctx.needs_input_grad[1]:
        ginv = (ga * positions.to(acc)[..., None]).reshape(-1, inv_freq.shape[0]).sum(0).to(inv_freq.dtype)
    return gpos, ginv, None, None


def _cos_sin_jvp(primals, tangents):
    positions, inv_freq, attention_factor, dtype = primals
    acc = acc_dtype(dtype, inv_freq.dtype, positions.dtype if positions.is_floating_point() else dtype)
    with skip_value_checks():
        cos, sin = rope_cos_sin_op(positions, inv_freq, attention_factor, dtype)
    da = torch.zeros(cos.shape, dtype=acc, device=cos.device)
    if "positions" in tangents:
        da = da + tangents["positions"].to(acc)[..., None] * inv_freq.to(acc)
    if "inv_freq" in tangents:
        da = da + positions.to(acc)[..., None] * tangents["inv_freq"].to(acc)
    return (-sin.to(acc) * da).to(dtype), (cos.to(acc) * da).to(dtype)


registry.register_autograd(
    "rope_cos_sin", _cos_sin_backward, setup_context=_cos_sin_setup_context, differentiable=("positions", "inv_freq"),
    jvp=_cos_sin_jvp,
)  # fmt: skip
