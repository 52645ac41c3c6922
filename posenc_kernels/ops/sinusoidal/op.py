"""Sinusoidal ops: their declarations, the checks shared by the fakes and every implementation, the
implementations per backend, and autograd. ``posenc::sinusoidal_table`` builds encodings (a factory op: its
``device`` argument picks the kernel when there are no positions); ``posenc::add_sinusoidal_`` /
``posenc::add_sinusoidal`` add them into x (backward ``grad * x_scale``); ``posenc::concat_sinusoidal``
returns ``[x | PE]``. The native extension implements all four for CPU and CUDA (``csrc/sinusoidal_*``).
"""

from __future__ import annotations

import math

import torch

from .. import registry
from ..pair import define_pair
from ..checks import FLOAT_DTYPES, INT_DTYPES, acc_dtype, check_tensor, check_writable
from ..positions import check_position_args
from .kernel import sinusoidal_triton
from .torch_impl import sinusoidal_inv_freq, sinusoidal_torch

_CONVENTION = "float base, bool interleaved, bool cos_first, float freq_shift, float scale"
_ADD_ARGS = f"Tensor? positions, Tensor? offsets, SymInt offset, float x_scale, {_CONVENTION}"


def check_convention(dim, base, freq_shift, scale, *, name: str = "dim") -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if dim <= 0:
        raise ValueError(f"{name} must be a positive int, got {dim!r}")
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    if not math.isfinite(freq_shift):
        raise ValueError(f"freq_shift must be finite, got {freq_shift!r}")
    half = dim // 2
    if half > 0 and half - freq_shift == 0:
        raise ValueError(
            f"freq_shift={freq_shift} with {name}={dim} divides by zero: the exponent is i / ({name} // 2 - "
            "freq_shift); use dim >= 4 with freq_shift=1, or freq_shift=0"
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")


def _as_bsd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def _check_x_positions(x, positions, offsets, offset) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    x3 = _as_bsd(x)
    check_position_args(
        positions, offsets, offset, batch=x3.shape[0], seqlen=x3.shape[1], device=x.device, integer_positions=False
    )


def check_table(positions, length, dim, base, interleaved, cos_first, freq_shift, scale, dtype, device, *, values):
    check_convention(dim, base, freq_shift, scale)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if positions is None:
        if length < 0:
            raise ValueError(f"positions_or_length must be >= 0, got {length}")
        return
    if positions.dtype == torch.bool or positions.dtype not in INT_DTYPES + FLOAT_DTYPES:
        raise TypeError(f"positions must be an integer or floating tensor, got dtype {positions.dtype}")
    if positions.device != torch.device(device):
        raise ValueError(f"device ({device}) must match the positions' device ({positions.device})")


def check_add(x, positions, offsets, offset, x_scale, base, interleaved, cos_first, freq_shift, scale, *, values,
              inplace: bool) -> None:  # fmt: skip
    """Every check of the add ops, before anything is written (x may have any strides). ``values`` adds
    those that need real storage (writability of an in-place x): implementations run them, fakes cannot."""
    _check_x_positions(x, positions, offsets, offset)
    check_convention(x.shape[-1], base, freq_shift, scale)
    if not math.isfinite(x_scale):
        raise ValueError(f"x_scale must be finite, got {x_scale!r}")
    if values and inplace:
        check_writable("x", x)


def check_concat(x, positions, offsets, offset, dim_pe, base, interleaved, cos_first, freq_shift, scale, *,
                 values) -> None:  # fmt: skip
    _check_x_positions(x, positions, offsets, offset)
    check_convention(dim_pe, base, freq_shift, scale, name="dim_pe")


def run_launcher(launcher, x, out, positions, offsets, offset, x_scale, base, interleaved, cos_first, freq_shift, scale):
    """``out`` ``[B, S, D]``: the frequencies of its D, then the backend's launcher."""
    if out.shape[0] * out.shape[1] == 0:
        return
    inv_freq = sinusoidal_inv_freq(out.shape[-1] // 2, float(base), float(freq_shift), out.device, acc_dtype(out.dtype))
    launcher(x, out, positions, offsets, offset, x_scale, inv_freq, scale, interleaved, cos_first)


def _table_impl(launcher):
    def impl(positions, length, dim, base, interleaved, cos_first, freq_shift, scale, dtype, device):
        shape = (length, dim) if positions is None else tuple(positions.shape) + (dim,)
        out = torch.empty(shape, dtype=dtype, device=device)
        rows = None if positions is None else positions.reshape(1, -1)
        run_launcher(launcher, None, out.view(1, -1, dim), rows, None, 0, 1.0, base, interleaved, cos_first, freq_shift, scale)
        return out

    return impl


def _table_fake(positions, length, dim, base, interleaved, cos_first, freq_shift, scale, dtype, device):
    shape = (length, dim) if positions is None else tuple(positions.shape) + (dim,)
    return torch.empty(shape, dtype=dtype, device=device)


def _add_body(launcher, outs, x, *rest):
    run_launcher(launcher, _as_bsd(x), _as_bsd(outs[0]), *rest)


def _concat_impl(launcher):
    def impl(x, positions, offsets, offset, dim_pe, *convention):
        """x is read once and the output written once: the encoding part by the kernel writing into the
        output's tail view (table mode), the x part by a copy into its head view."""
        D = x.shape[-1]
        out = x.new_empty(tuple(x.shape[:-1]) + (D + dim_pe,))
        o3 = _as_bsd(out)
        run_launcher(launcher, None, o3[..., D:], positions, offsets, offset, 1.0, *convention)
        o3[..., :D].copy_(_as_bsd(x))
        return out

    return impl


#: The launchers, per backend: ``launcher(x, out, positions, offsets, offset, x_scale, inv_freq, scale,
#: interleaved, cos_first)`` writes ``out`` ``[B, S, D]``.
LAUNCHERS = {"triton": sinusoidal_triton, "torch": sinusoidal_torch}

sinusoidal_table_op = registry.define(
    f"sinusoidal_table(Tensor? positions, SymInt length, SymInt dim, {_CONVENTION}, ScalarType dtype, Device device) -> Tensor",
    check=check_table,
    fake=_table_fake,
    impls={k: _table_impl(v) for k, v in LAUNCHERS.items()},
    native=True,
    factory=True,
)

concat_sinusoidal_op = registry.define(
    f"concat_sinusoidal(Tensor x, Tensor? positions, Tensor? offsets, SymInt offset, SymInt dim_pe, {_CONVENTION}) -> Tensor",
    check=check_concat,
    fake=lambda x, positions, offsets, offset, dim_pe, *rest: x.new_empty(tuple(x.shape[:-1]) + (x.shape[-1] + dim_pe,)),
    impls={k: _concat_impl(v) for k, v in LAUNCHERS.items()},
    native=True,
)

_N_ADD_ARGS = 10  # x and the nine arguments after it


# ---- autograd: linear in x; w.r.t. float positions through the slope of the encoding
#
# d/dp sin(scale * p * f) = scale * f * cos(scale * p * f) and d/dp cos(...) = -scale * f * sin(...): the
# slope is the table with sin and cos swapped (cos_first flipped), times scale * f and the sign of the
# channel. Built with sinusoidal_table itself, so it is differentiable again (double backward).


def _slope_coef(dim, base, interleaved, cos_first, freq_shift, scale, device, dtype):
    half = dim // 2
    f = sinusoidal_inv_freq(half, float(base), float(freq_shift), device, dtype) * scale
    first, second = (-f, f) if cos_first else (f, -f)  # sin channels +, cos channels -
    coef = torch.stack((first, second), -1).flatten() if interleaved else torch.cat((first, second))
    return torch.nn.functional.pad(coef, (0, dim - 2 * half))


def pe_slope(positions, dim, base, interleaved, cos_first, freq_shift, scale, dtype):
    """``d PE / d position``, ``positions.shape + (dim,)`` in ``dtype``."""
    swapped = sinusoidal_table_op(
        positions, 0, dim, base, interleaved, not cos_first, freq_shift, scale, dtype, positions.device
    )
    return swapped * _slope_coef(dim, base, interleaved, cos_first, freq_shift, scale, positions.device, dtype)


def _float_positions(positions) -> bool:
    return positions is not None and positions.is_floating_point()


def _positions_grad(grad, positions, convention):
    """Gradient of float positions ``[B, S]`` / ``[S]`` / ``[T]`` from the encoding part's ``grad``."""
    acc = acc_dtype(grad.dtype, positions.dtype)
    g = (grad.to(acc) * pe_slope(positions, grad.shape[-1], *convention, acc)).sum(-1)
    while g.dim() > positions.dim():  # positions [S] shared by every sequence
        g = g.sum(0)
    return g.to(positions.dtype)


def _positions_tangent(positions, dpos, dim, convention, dtype):
    acc = acc_dtype(dtype, positions.dtype)
    return (pe_slope(positions, dim, *convention, acc) * dpos.to(acc)[..., None]).to(dtype)


def _table_setup_context(ctx, inputs, output):
    positions = inputs[0]
    ctx.save_for_backward(positions if _float_positions(positions) else None)
    ctx.convention = tuple(inputs[3:8])


def _table_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    gpos = _positions_grad(grad, positions, ctx.convention) if ctx.needs_input_grad[0] else None
    return (gpos,) + (None,) * 9


def _table_jvp(primals, tangents):
    positions, _, dim, *convention = primals[:8]
    return _positions_tangent(positions, tangents["positions"], dim, convention, primals[8])


registry.register_autograd(
    "sinusoidal_table", _table_backward, setup_context=_table_setup_context, differentiable=("positions",),
    jvp=_table_jvp,
)  # fmt: skip


def _add_setup_context(ctx, inputs, output):
    positions = inputs[1]
    ctx.save_for_backward(positions if _float_positions(positions) else None)
    ctx.x_scale, ctx.convention = inputs[4], tuple(inputs[5:10])


def _add_backward(ctx, grad):
    # d(x * x_scale + PE(positions))/dx = x_scale; float positions through the slope of PE.
    (positions,) = ctx.saved_tensors
    gx = grad * ctx.x_scale if ctx.needs_input_grad[0] else None
    gpos = _positions_grad(grad, positions, ctx.convention) if ctx.needs_input_grad[1] else None
    return (gx, gpos) + (None,) * (_N_ADD_ARGS - 2)


def _add_jvp(primals, tangents):
    x, positions, x_scale, convention = primals[0], primals[1], primals[4], primals[5:10]
    t = tangents["x"] * x_scale if "x" in tangents else torch.zeros_like(x)
    if "positions" in tangents:
        t = t + _positions_tangent(positions, tangents["positions"], x.shape[-1], convention, x.dtype)
    return t


add_sinusoidal = define_pair(
    "add_sinusoidal",
    f"Tensor x, {_ADD_ARGS}",
    mutates=("x",),
    differentiable=("x", "positions"),
    check=check_add,
    body=_add_body,
    launchers=LAUNCHERS,
    setup_context=_add_setup_context,
    backward=_add_backward,
    native=True,
    jvp=_add_jvp,
)


def _concat_setup_context(ctx, inputs, output):
    positions = inputs[1]
    ctx.save_for_backward(positions if _float_positions(positions) else None)
    ctx.d, ctx.convention = inputs[0].shape[-1], tuple(inputs[5:10])


def _concat_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    gx = grad[..., : ctx.d] if ctx.needs_input_grad[0] else None
    gpos = _positions_grad(grad[..., ctx.d :], positions, ctx.convention) if ctx.needs_input_grad[1] else None
    return (gx, gpos) + (None,) * (_N_ADD_ARGS - 2)


def _concat_jvp(primals, tangents):
    x, positions, dim_pe, convention = primals[0], primals[1], primals[4], primals[5:10]
    tx = tangents["x"] if "x" in tangents else torch.zeros_like(x)
    if "positions" in tangents:
        tpe = _positions_tangent(positions, tangents["positions"], dim_pe, convention, x.dtype)
        tpe = tpe.expand(tuple(x.shape[:-1]) + (dim_pe,))
    else:
        tpe = x.new_zeros(tuple(x.shape[:-1]) + (dim_pe,))
    return torch.cat((tx, tpe), -1)


registry.register_autograd(
    "concat_sinusoidal", _concat_backward, setup_context=_concat_setup_context, differentiable=("x", "positions"),
    jvp=_concat_jvp,
)  # fmt: skip
