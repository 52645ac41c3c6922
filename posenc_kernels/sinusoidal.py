"""Sinusoidal absolute position encodings: table generation and the fused ``x * x_scale + PE`` add.

Read top-down: Triton kernel -> pure-torch implementation -> validation and launchers -> torch.library
ops (fake + autograd) -> public functions -> nn.Module.

One parameterisation covers the published conventions. With ``half = dim // 2``:

    inv_freq[i] = base ** (-i / (half - freq_shift))          for i < half
    angle[p, i] = scale * (fp32(pos[p]) * inv_freq[i])
    interleaved=True:  PE[p, 2i] = sin, PE[p, 2i + 1] = cos    (cos_first swaps each pair)
    interleaved=False: PE[p, i] = sin, PE[p, half + i] = cos   (cos_first swaps the halves)
    odd dim: the last column is zero.

See ``SINUSOIDAL_CONVENTIONS`` for the settings that reproduce each source.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch

from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INT_DTYPES,
    check_last_stride,
    check_position_args,
    check_tensor,
    check_inplace_autograd,
    check_writable,
    device_guard,
    next_pow2,
    prev_pow2,
    resolve_backend,
    split_offsets,
    tl_acc_dtype,
    token_positions,
)
from .ops.positions import PosMode

POS_OFFSET, POS_OFFSETS, POS_POSITIONS = int(PosMode.OFFSET), int(PosMode.OFFSETS), int(PosMode.POSITIONS)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "SINUSOIDAL_CONVENTIONS",
    "sinusoidal_table",
    "add_sinusoidal_",
    "add_sinusoidal",
    "concat_sinusoidal",
    "SinusoidalPositionalEncoding",
]

#: Keyword settings of :func:`sinusoidal_table` / :func:`add_sinusoidal_` that reproduce each source.
SINUSOIDAL_CONVENTIONS = {
    # Vaswani et al. 2017: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).
    "transformer": dict(interleaved=True, cos_first=False, freq_shift=0.0),
    # tensor2tensor get_timing_signal_1d: [sin | cos], log step log(max/min) / (channels//2 - 1); with a
    # min_timescale other than 1 add base=max_timescale/min_timescale, scale=min_timescale.
    "tensor2tensor": dict(interleaved=False, cos_first=False, freq_shift=1.0),
    # fairseq SinusoidalPositionalEmbedding.get_embedding: same as tensor2tensor (fairseq's module numbers
    # tokens from padding_idx + 1: pass those positions).
    "fairseq": dict(interleaved=False, cos_first=False, freq_shift=1.0),
    # diffusers get_timestep_embedding defaults (flip_sin_to_cos=False, downscale_freq_shift=1); its
    # flip_sin_to_cos maps to cos_first, downscale_freq_shift to freq_shift, max_period to base.
    "diffusers": dict(interleaved=False, cos_first=False, freq_shift=1.0),
}


# ==============================================================================================
# Triton kernel
# ==============================================================================================
if HAS_TRITON:

    @triton.jit
    def _sinusoidal_kernel(
        x_ptr,
        out_ptr,
        pos_ptr,
        inv_freq_ptr,
        n_tokens,
        seqlen,
        offset,
        x_scale,
        scale,
        stride_x_b,
        stride_x_s,
        stride_o_b,
        stride_o_s,
        stride_pos_b,
        stride_pos_s,
        HALF: tl.constexpr,
        PAD: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
        POS_MODE: tl.constexpr,
        HAS_X: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        COS_FIRST: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid: (token blocks, frequency blocks). Writes PE (or x * x_scale + PE) for BLOCK_T tokens x
        BLOCK_C frequencies; every angle gives one sin and one cos, so each transcendental is used once."""
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        pid_c = tl.program_id(1)
        tok_mask = t < n_tokens
        b = t // seqlen
        s = t - b * seqlen
        # Angles in ACC: fp32 (positions rounded to fp32 first, as every published implementation does),
        # fp64 for fp64 outputs.
        if POS_MODE == 0:
            pos = (s + offset).to(ACC)
        elif POS_MODE == 1:
            pos = (tl.load(pos_ptr + b * stride_pos_b, mask=tok_mask, other=0).to(tl.int64) + s).to(ACC)
        else:
            pos = tl.load(pos_ptr + b * stride_pos_b + s * stride_pos_s, mask=tok_mask, other=0).to(ACC)
        f = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inv = tl.load(inv_freq_ptr + f, mask=f < HALF, other=0.0).to(ACC)
        angle = (pos[:, None] * inv[None, :]) * scale
        if COS_FIRST:
            first = tl.cos(angle)
            second = tl.sin(angle)
        else:
            first = tl.sin(angle)
            second = tl.cos(angle)
        x_tok = (b * stride_x_b + s * stride_x_s)[:, None]
        o_tok = (b * stride_o_b + s * stride_o_s)[:, None]
        if INTERLEAVED:
            ch = pid_c * (2 * BLOCK_C) + tl.arange(0, 2 * BLOCK_C)[None, :]
            m = tok_mask[:, None] & (ch < 2 * HALF)
            pe = tl.reshape(tl.join(first, second), [BLOCK_T, 2 * BLOCK_C])
            if HAS_X:
                pe = tl.load(x_ptr + x_tok + ch, mask=m, other=0.0).to(ACC) * x_scale + pe
            tl.store(out_ptr + o_tok + ch, pe.to(out_ptr.dtype.element_ty), mask=m)
        else:
            ch = f[None, :]
            m = tok_mask[:, None] & (ch < HALF)
            pe1 = first
            pe2 = second
            if HAS_X:
                pe1 = tl.load(x_ptr + x_tok + ch, mask=m, other=0.0).to(ACC) * x_scale + pe1
                pe2 = tl.load(x_ptr + x_tok + HALF + ch, mask=m, other=0.0).to(ACC) * x_scale + pe2
            tl.store(out_ptr + o_tok + ch, pe1.to(out_ptr.dtype.element_ty), mask=m)
            tl.store(out_ptr + o_tok + HALF + ch, pe2.to(out_ptr.dtype.element_ty), mask=m)
        if PAD:
            if pid_c == 0:  # odd dim: the last column carries no encoding
                last = 2 * HALF
                val = tl.zeros([BLOCK_T, 1], dtype=ACC)
                if HAS_X:
                    val = tl.load(x_ptr + x_tok + last, mask=tok_mask[:, None], other=0.0).to(ACC) * x_scale
                tl.store(out_ptr + o_tok + last, val.to(out_ptr.dtype.element_ty), mask=tok_mask[:, None])


# ==============================================================================================
# Frequencies (shared by both backends) and the pure-torch implementation
# ==============================================================================================


@functools.lru_cache(maxsize=64)
def _inv_freq(half: int, base: float, freq_shift: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Inverse frequencies computed in float64 and rounded once to ``dtype`` (fp32, or fp64 for fp64
    outputs); cached per device (a few bytes)."""
    i = torch.arange(half, dtype=torch.float64)
    return torch.exp(-math.log(base) * i / (half - freq_shift)).to(device=device, dtype=dtype)


_TORCH_CHUNK_ELEMS = 1 << 21


def _sinusoidal_torch(x, out, rows, inv_freq, half, x_scale, scale, interleaved, cos_first):
    """Writes PE (x None) or x * x_scale + PE into ``out`` ``[B, S, D]``, chunked along S; the encodings
    are computed once per chunk when every sequence uses the same rows."""
    B, S, D = out.shape
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    shared_rows = rows.stride(0) == 0
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, (1 if shared_rows else B) * D))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        r = rows[:1, s0:s1] if shared_rows else rows[:, s0:s1]
        angle = (r.to(inv_freq.dtype)[..., None] * inv_freq) * scale
        sn, cs = angle.sin(), angle.cos()
        first, second = (cs, sn) if cos_first else (sn, cs)
        pe = torch.stack((first, second), dim=-1).flatten(-2) if interleaved else torch.cat((first, second), -1)
        if D > 2 * half:
            pe = torch.nn.functional.pad(pe, (0, D - 2 * half))
        pe = pe.to(acc)
        if x is None:
            out[:, s0:s1].copy_(pe)
        elif x.dtype == acc:  # one pointwise pass, writing straight into out (which may be x)
            torch.add(pe, x[:, s0:s1], alpha=x_scale, out=out[:, s0:s1])
        else:
            out[:, s0:s1].copy_(torch.add(pe, x[:, s0:s1].to(acc), alpha=x_scale))


# ==============================================================================================
# Validation and launchers
# ==============================================================================================


def _check_convention(dim, base, freq_shift, scale) -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, torch.SymInt)):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    if not math.isfinite(freq_shift):
        raise ValueError(f"freq_shift must be finite, got {freq_shift!r}")
    half = dim // 2
    if half > 0 and half - freq_shift == 0:
        raise ValueError(
            f"freq_shift={freq_shift} with dim={dim} divides by zero: the exponent is i / (dim // 2 - freq_shift); "
            "use dim >= 4 with freq_shift=1, or freq_shift=0"
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")


def _sinusoidal_launch(x, out, positions, offsets, offset, x_scale, base, interleaved, cos_first, freq_shift, scale):
    """Shared launcher: ``out`` is ``[B, S, D]``; ``x`` is None (table) or ``[B, S, D]`` (add)."""
    B, S, D = out.shape
    if B * S == 0:
        return
    half = D // 2
    math_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    inv_freq = _inv_freq(half, float(base), float(freq_shift), out.device, math_dtype)
    backend = resolve_backend(out.device, native="sinusoidal")
    if backend == "native":
        from . import _native

        _native.sinusoidal(x, out, positions, offsets, offset, float(x_scale), inv_freq, float(scale), interleaved, cos_first)
        return
    if backend != "triton":
        rows = token_positions(positions, offsets, offset, B, S, out.device)
        _sinusoidal_torch(x, out, rows, inv_freq, half, x_scale, scale, interleaved, cos_first)
        return
    if positions is not None:
        pos_mode, pos = POS_POSITIONS, positions
        spos_b = positions.stride(0) if positions.dim() == 2 else 0
        spos_s = positions.stride(-1)
    elif offsets is not None:
        pos_mode, pos, spos_b, spos_s = POS_OFFSETS, offsets, offsets.stride(0), 0
    else:
        pos_mode, pos, spos_b, spos_s = POS_OFFSET, None, 0, 0
    xx = x if x is not None else out
    block_c, block_t, num_warps = _sinusoidal_blocks(half, B * S)
    grid = (triton.cdiv(B * S, block_t), max(1, triton.cdiv(half, block_c)))
    with device_guard(out):
        _sinusoidal_kernel[grid](
            xx, out, pos, inv_freq,
            B * S, S, offset, float(x_scale), float(scale),
            xx.stride(0), xx.stride(1), out.stride(0), out.stride(1), spos_b, spos_s,
            HALF=half, PAD=D % 2 == 1, BLOCK_T=block_t, BLOCK_C=block_c, POS_MODE=pos_mode,
            HAS_X=x is not None, INTERLEAVED=interleaved, COS_FIRST=cos_first, ACC=tl_acc_dtype(out.dtype),
            num_warps=num_warps,
        )  # fmt: skip


_ANGLES_PER_PROGRAM = 2048


def _sinusoidal_blocks(half: int, n_tokens: int):
    """Tile heuristic: about 2048 angles (4096 outputs) per program over 8 warps, ~8 sin/cos pairs per
    thread; up to 128 frequencies wide, the rest in tokens. Chosen by compiling the candidates for sm_90
    with Triton 3.6 and 3.9: this one spills in neither (1024 angles over 4 warps spilled 4 bytes in
    libdevice's sinf slow path, 256-wide tiles spilled 20 bytes for odd D); tests/test_static_ptx.py
    keeps it so."""
    block_c = max(1, min(next_pow2(half), 128))
    block_t = max(1, min(_ANGLES_PER_PROGRAM // block_c, next_pow2(n_tokens), 64))
    num_warps = prev_pow2(min(8, max(1, block_t * block_c // 256)))
    return block_c, block_t, num_warps


def _as_bsd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def _check_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, *, inplace: bool) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    check_last_stride("x", x)
    x3 = _as_bsd(x)
    _check_convention(x3.shape[-1], base, freq_shift, scale)
    if not math.isfinite(x_scale):
        raise ValueError(f"x_scale must be finite, got {x_scale!r}")
    check_position_args(
        positions, offsets, offset, batch=x3.shape[0], seqlen=x3.shape[1], device=x.device,
        integer_positions=False, offsets_name="offset",
    )  # fmt: skip
    if inplace:
        check_writable("x", x)


# ==============================================================================================
# torch.library ops
# ==============================================================================================


@torch.library.custom_op("posenc::sinusoidal_table", mutates_args=())
def _sinusoidal_table_op(
    positions: Optional[torch.Tensor],
    length: int,
    dim: int,
    base: float,
    interleaved: bool,
    cos_first: bool,
    freq_shift: float,
    scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """PE rows for ``positions`` (any shape, int or float) or, when None, for ``0..length-1``."""
    shape = _check_table(positions, length, dim, base, freq_shift, scale, dtype, device)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(1, -1, dim)
    rows = None if positions is None else positions.reshape(1, -1)
    _sinusoidal_launch(None, flat, rows, None, 0, 1.0, base, interleaved, cos_first, freq_shift, scale)
    return out


@_sinusoidal_table_op.register_fake
def _(positions, length, dim, base, interleaved, cos_first, freq_shift, scale, dtype, device):
    shape = _check_table(positions, length, dim, base, freq_shift, scale, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_table(positions, length, dim, base, freq_shift, scale, dtype, device):
    _check_convention(dim, base, freq_shift, scale)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if positions is None:
        if length < 0:
            raise ValueError(f"positions_or_length must be >= 0, got {length}")
        return (length, dim)
    if positions.dtype == torch.bool or positions.dtype not in INT_DTYPES + FLOAT_DTYPES:
        raise TypeError(f"positions must be an integer or floating tensor, got dtype {positions.dtype}")
    return tuple(positions.shape) + (dim,)


@torch.library.custom_op("posenc::add_sinusoidal_", mutates_args=("x",))
def _add_sinusoidal_inplace_op(
    x: torch.Tensor,
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    x_scale: float,
    base: float,
    interleaved: bool,
    cos_first: bool,
    freq_shift: float,
    scale: float,
) -> None:
    """In place: x <- x * x_scale + PE(position of each token)."""
    _check_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, inplace=True)
    x3 = _as_bsd(x)
    _sinusoidal_launch(x3, x3, positions, offsets, offset, x_scale, base, interleaved, cos_first, freq_shift, scale)


@_add_sinusoidal_inplace_op.register_fake
def _(x, positions, offsets, offset, x_scale, base, interleaved, cos_first, freq_shift, scale):
    _check_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, inplace=True)


@torch.library.custom_op("posenc::add_sinusoidal", mutates_args=())
def _add_sinusoidal_op(
    x: torch.Tensor,
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    x_scale: float,
    base: float,
    interleaved: bool,
    cos_first: bool,
    freq_shift: float,
    scale: float,
) -> torch.Tensor:
    """Out of place: returns x * x_scale + PE."""
    _check_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, inplace=False)
    out = torch.empty_like(x)
    _sinusoidal_launch(
        _as_bsd(x), _as_bsd(out), positions, offsets, offset, x_scale, base, interleaved, cos_first, freq_shift, scale
    )
    return out


@_add_sinusoidal_op.register_fake
def _(x, positions, offsets, offset, x_scale, base, interleaved, cos_first, freq_shift, scale):
    _check_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, inplace=False)
    return torch.empty_like(x)


def _add_setup_context(ctx, inputs, output):
    ctx.x_scale = inputs[4]


def _add_backward(ctx, grad):
    # d(x * x_scale + PE)/dx = x_scale; positions and the convention are not differentiable.
    return grad * ctx.x_scale, None, None, None, None, None, None, None, None, None


_add_sinusoidal_op.register_autograd(_add_backward, setup_context=_add_setup_context)


class _AddSinusoidalInplaceFunction(torch.autograd.Function):
    """In-place autograd: marks x dirty (PyTorch's in-place rules apply); backward is grad * x_scale."""

    @staticmethod
    def forward(ctx, x, *args):
        torch.ops.posenc.add_sinusoidal_(x, *args)
        ctx.mark_dirty(x)
        _add_setup_context(ctx, (x, *args), None)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _add_backward(ctx, grad)


def _check_concat(x, positions, offsets, offset, dim_pe, base, freq_shift, scale) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    if isinstance(dim_pe, bool) or not isinstance(dim_pe, (int, torch.SymInt)):
        raise TypeError(f"dim_pe must be an int, got {type(dim_pe).__name__}")
    if dim_pe <= 0:
        raise ValueError(f"dim_pe must be a positive int, got {dim_pe!r}")
    _check_convention(dim_pe, base, freq_shift, scale)
    x3 = _as_bsd(x)
    check_position_args(
        positions, offsets, offset, batch=x3.shape[0], seqlen=x3.shape[1], device=x.device,
        integer_positions=False, offsets_name="offset",
    )  # fmt: skip


@torch.library.custom_op("posenc::concat_sinusoidal", mutates_args=())
def _concat_sinusoidal_op(
    x: torch.Tensor,
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    dim_pe: int,
    base: float,
    interleaved: bool,
    cos_first: bool,
    freq_shift: float,
    scale: float,
) -> torch.Tensor:
    """[x | PE]: x's D channels then dim_pe encoding channels. x is read once and the output written
    once: the encoding part by the sinusoidal kernel writing into the output's tail view (table mode),
    the x part by a copy into its head view."""
    _check_concat(x, positions, offsets, offset, dim_pe, base, freq_shift, scale)
    D = x.shape[-1]
    out = x.new_empty(tuple(x.shape[:-1]) + (D + dim_pe,))
    o3 = _as_bsd(out)
    _sinusoidal_launch(
        None, o3[..., D:], positions, offsets, offset, 1.0, base, interleaved, cos_first, freq_shift, scale
    )
    o3[..., :D].copy_(_as_bsd(x))
    return out


@_concat_sinusoidal_op.register_fake
def _(x, positions, offsets, offset, dim_pe, base, interleaved, cos_first, freq_shift, scale):
    _check_concat(x, positions, offsets, offset, dim_pe, base, freq_shift, scale)
    return x.new_empty(tuple(x.shape[:-1]) + (x.shape[-1] + dim_pe,))


def _concat_setup_context(ctx, inputs, output):
    ctx.d = inputs[0].shape[-1]


def _concat_backward(ctx, grad):
    return grad[..., : ctx.d], None, None, None, None, None, None, None, None, None


_concat_sinusoidal_op.register_autograd(_concat_backward, setup_context=_concat_setup_context)


# ==============================================================================================
# Public functions
# ==============================================================================================


def sinusoidal_table(
    positions_or_length: Union[int, torch.Tensor],
    dim: int,
    *,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Sinusoidal encodings ``[..., dim]`` for int or float positions of any shape (or ``0..P-1``).

    The defaults give the original Transformer's table; ``SINUSOIDAL_CONVENTIONS`` lists the settings of
    tensor2tensor, fairseq and diffusers (``scale`` multiplies the angle, as diffusers' does). Math in fp32
    (fp64 for ``dtype=torch.float64``). ``device`` places a table built from a length (default CPU); a
    tensor of positions gives its own device.

    >>> import torch, posenc_kernels as pk
    >>> pe = pk.sinusoidal_table(50, 16)                        # Vaswani et al.
    >>> pe.shape
    torch.Size([50, 16])
    >>> t = torch.tensor([0.5, 999.0])                          # diffusion timesteps
    >>> emb = pk.sinusoidal_table(t, 32, **{**pk.SINUSOIDAL_CONVENTIONS["diffusers"], "cos_first": True})
    >>> emb.shape
    torch.Size([2, 32])
    """
    if isinstance(positions_or_length, torch.Tensor):
        positions, length = positions_or_length, 0
        if device is not None and torch.device(device) != positions.device:
            raise ValueError(f"device ({device}) must match the positions' device ({positions.device}) or be None")
        device = positions.device
    elif isinstance(positions_or_length, int) and not isinstance(positions_or_length, bool):
        positions, length = None, positions_or_length
        device = torch.device("cpu") if device is None else torch.device(device)
    else:
        raise TypeError(f"positions_or_length must be an int or a tensor, got {type(positions_or_length).__name__}")
    return torch.ops.posenc.sinusoidal_table(
        positions, length, dim, float(base), interleaved, cos_first, float(freq_shift), float(scale), dtype, device
    )


def _add_args(positions, offset, x_scale, base, interleaved, cos_first, freq_shift, scale):
    offsets_t, off = split_offsets(offset, "offset")
    return (positions, offsets_t, off, float(x_scale), float(base), interleaved, cos_first, float(freq_shift), float(scale))


def add_sinusoidal_(
    x: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offset: Union[int, torch.Tensor] = 0,
    x_scale: float = 1.0,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """In place ``x <- x * x_scale + PE`` in one pass over ``x`` ``[B, S, D]`` or ``[T, D]``.

    The position of token ``(b, s)`` is ``positions[b, s]`` (or ``positions[s]``; int or float) when given,
    else ``offset + s`` with ``offset`` an int or a ``[B]`` tensor. Returns ``x``. Differentiable w.r.t. x.

    >>> import torch, posenc_kernels as pk
    >>> x = torch.zeros(2, 6, 8)
    >>> _ = pk.add_sinusoidal_(x, x_scale=8 ** 0.5)
    >>> torch.allclose(x[0], pk.sinusoidal_table(6, 8))
    True
    """
    args = _add_args(positions, offset, x_scale, base, interleaved, cos_first, freq_shift, scale)
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        if not torch.compiler.is_compiling():  # autograd's own in-place errors, before anything is written
            positions_, offsets_t, off, xs, base_, _, _, shift, scale_ = args
            _check_add(x, positions_, offsets_t, off, xs, base_, shift, scale_, inplace=True)
            check_inplace_autograd("x", x)
        return _AddSinusoidalInplaceFunction.apply(x, *args)
    torch.ops.posenc.add_sinusoidal_(x, *args)
    return x


def add_sinusoidal(
    x: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offset: Union[int, torch.Tensor] = 0,
    x_scale: float = 1.0,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Out-of-place twin of :func:`add_sinusoidal_`: returns ``x * x_scale + PE``, x untouched.

    >>> import torch, posenc_kernels as pk
    >>> y = pk.add_sinusoidal(torch.ones(10, 4), offset=3)
    >>> y.shape
    torch.Size([10, 4])
    """
    args = _add_args(positions, offset, x_scale, base, interleaved, cos_first, freq_shift, scale)
    return torch.ops.posenc.add_sinusoidal(x, *args)


def concat_sinusoidal(
    x: torch.Tensor,
    dim_pe: int,
    *,
    positions: Optional[torch.Tensor] = None,
    offset: Union[int, torch.Tensor] = 0,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Concatenate instead of add: returns ``[x | PE]`` of shape ``[..., D + dim_pe]``.

    ``x`` is ``[B, S, D]`` or ``[T, D]``; positions/offset and the convention keywords as in
    :func:`add_sinusoidal_`. x is read once and the output written once (its encoding part is computed in
    the kernel, never read from a table). Differentiable w.r.t. x. Compared with the add, the output is
    wider (D + dim_pe channels to write instead of D) and every layer after it grows with it.

    >>> import torch, posenc_kernels as pk
    >>> y = pk.concat_sinusoidal(torch.ones(2, 5, 8), 4)
    >>> y.shape, bool((y[..., :8] == 1).all())
    (torch.Size([2, 5, 12]), True)
    """
    offsets_t, off = split_offsets(offset, "offset")
    return torch.ops.posenc.concat_sinusoidal(
        x, positions, offsets_t, off, dim_pe, float(base), interleaved, cos_first, float(freq_shift), float(scale)
    )


class SinusoidalPositionalEncoding(torch.nn.Module):
    """``x * x_scale + PE`` as a module (no parameters, no buffers: encodings are computed in the kernel).

    >>> import torch, posenc_kernels as pk
    >>> enc = pk.SinusoidalPositionalEncoding(16, x_scale=4.0)
    >>> enc(torch.randn(2, 7, 16)).shape
    torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        dim: int,
        *,
        x_scale: float = 1.0,
        base: float = 10000.0,
        interleaved: bool = True,
        cos_first: bool = False,
        freq_shift: float = 0.0,
        scale: float = 1.0,
        inplace: bool = False,
    ):
        super().__init__()
        _check_convention(dim, base, freq_shift, scale)
        self.dim, self.inplace = dim, inplace
        self.kwargs = dict(
            x_scale=x_scale, base=base, interleaved=interleaved, cos_first=cos_first, freq_shift=freq_shift, scale=scale
        )

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, offset=0) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have {self.dim} channels (the module's dim), got shape {tuple(x.shape)}")
        fn = add_sinusoidal_ if self.inplace else add_sinusoidal
        return fn(x, positions=positions, offset=offset, **self.kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, " + ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
